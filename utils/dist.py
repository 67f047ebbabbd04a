"""torchrun / DistributedDataParallel helpers that degrade to no-ops in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto"):
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    Returns the torch.device for this rank: ``cuda:LOCAL_RANK`` with NCCL when CUDA is available
    (unless device == 'cpu'), otherwise the CPU with gloo, so the same code runs on a laptop."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not is_dist():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
