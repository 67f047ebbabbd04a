"""Every collective of the project goes through this module (tests/test_dist.py fails if another
file calls ``torch.distributed`` directly).

Why one module:
* NCCL accepts only CUDA tensors ("No backend type associated with device type cpu"); gloo, which
  the CPU tests use, accepts CPU tensors, so a CPU tensor passed to a collective works in every
  test and crashes on the first multi-GPU run. Here every tensor is moved to
  :func:`collective_device` first and its result brought back.
* The process-group timeout is ours (``--dist-timeout``, default :data:`DEFAULT_TIMEOUT_S`), not
  NCCL's 10 minutes, and the entry points never put a collective after uneven per-rank work
  (inference ranks finish independently; see infer.py and infer_seg.py).
* Single-process runs call the same functions, which then do nothing.
* Inference (infer.py, infer_seg.py) joins no process group at all: each rank takes its share
  of the list from RANK / WORLD_SIZE, and rank 0 waits for the others' files with
  :func:`wait_for_outputs`, a file poll that no rank's early exit can turn into a hang.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence


class _LazyModule:
    """A module imported at its first attribute access. torch takes about 2 s to import, and the
    entry points that never use it (evaluate.py, the tools) reach this module only through
    utils/cli.py and utils/run.py, for the launch environment (RANK, WORLD_SIZE): they must not
    pay for it (tests/test_evaluate_cli.py checks that evaluate.py runs without importing torch)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


torch = _LazyModule("torch")
dist = _LazyModule("torch.distributed")

# Long enough for the slowest step that separates two collectives in any stage (rank 0 checking
# the 82k COCO saliency maps before training, or writing a 1.3 GB checkpoint to a slow disk):
# a hang is still reported, after 2 hours instead of NCCL's 10 minutes.
DEFAULT_TIMEOUT_S = 7200.0

_logger = logging.getLogger("dist")


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    # The deprecated `python -m torch.distributed.launch` appends --local-rank=N to the script's
    # flags (torch/distributed/run.py, without --use-env); LOCAL_RANK, which every launcher
    # sets, is what get_local_rank reads, so the flag is accepted and not used.
    parser.add_argument(
        "--local-rank", "--local_rank", dest="launcher_local_rank", type=int, default=None,
        help="set by python -m torch.distributed.launch; not used (the LOCAL_RANK environment "
             "variable is). Launch with torchrun instead")
    parser.add_argument(
        "--dist-timeout", "--dist_timeout", dest="dist_timeout", type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds a collective (barrier, all-reduce) may wait for the other processes under "
             f"torchrun before the job is aborted, and inference's rank 0 waits for the next file "
             f"of the other ranks (default {DEFAULT_TIMEOUT_S:.0f}; NCCL's own default of 600 is too "
             f"short for rank 0's checks of a COCO-sized list)")


def is_dist() -> bool:
    # No process group can exist before torch.distributed is imported (importing torch imports
    # it), and a torch-free process must not import it to learn that.
    return "torch.distributed" in sys.modules and dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else launched_rank()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world_size() -> int:
    """WORLD_SIZE of the torchrun launch (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK of the torchrun launch, whether or not a process group was joined (0 without
    torchrun, also when a stray RANK is left in the environment of a single-process run)."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL for CUDA
    devices, gloo for the CPU. ``device`` comes from utils.device.resolve_device."""
    if launched_world_size() <= 1 or is_dist():
        return
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be positive, got {timeout_s}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the rank to its GPU (no guessing in barriers)
    dist.init_process_group(**kwargs)


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_collective(t: torch.Tensor) -> torch.Tensor:
    """A private copy of ``t`` on the device the backend's collectives take."""
    return t.detach().to(collective_device(), copy=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks, returned on ``t``'s device (``t`` is not modified)."""
    if not is_dist():
        return t.clone()
    work = to_collective(t)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks, returned on ``t``'s device."""
    return all_reduce_sum(t) / get_world_size() if is_dist() else t.clone()


def all_gather_object(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; small ones only)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_dist():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` under torchrun, the model itself otherwise."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_on_main(check: Callable[[], Any]) -> Any:
    """Run a whole-dataset check (file headers of the training list) on rank 0 only, and let
    every rank raise its UserError: N ranks reading the same 82k files would be N times the I/O,
    and an error on one rank alone would leave the others waiting in the next collective.
    Returns the check's result on rank 0, None elsewhere."""
    import pickle

    from utils.errors import UserError
    result, error = None, None
    if is_main_process():
        try:
            result = check()
        except UserError as e:
            error = e
    if is_dist():
        try:  # the other ranks must be able to rebuild it (custom __init__ signatures cannot)
            pickle.loads(pickle.dumps(error))
        except Exception:  # an exception that cannot travel: its message can
            error = UserError(str(error))
        error = broadcast_object(error)
    if error is not None:
        raise error
    return result


def spans_nodes() -> bool:
    """True when the torchrun launch has processes on other machines too."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size())) < launched_world_size()


def wait_for_outputs(items: Sequence, done: Callable[[Any], bool], *, what: str,
                     timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 5.0) -> None:
    """Block until ``done(item)`` holds for every item: rank 0 of an inference launch waiting
    for the files the other ranks (on this node or another one sharing the folder) write at their
    own pace, so that whatever runs next (the evaluation) sees the whole list. A poll, not a
    collective: a rank that dies is reported by torchrun, and a node torchrun cannot see is
    reported here once ``timeout_s`` (--dist-timeout) pass WITHOUT a new output, naming what is
    still missing (a slow but working rank resets the clock with every file it writes)."""
    from utils.errors import UserError
    pending = [i for i in items if not done(i)]
    t0 = last_new = last_log = time.monotonic()
    while pending:
        now = time.monotonic()
        if now - last_new > timeout_s:
            raise UserError(
                f"waited {timeout_s:.0f} s (--dist-timeout) without a new file of the other "
                f"ranks' {what}; {len(pending)} still missing, e.g. "
                f"{', '.join(map(str, pending[:3]))}. Check the other ranks' logs (a node that "
                f"died, or a folder that is not shared between the nodes), then rerun: finished "
                f"outputs are kept")
        if now - last_log >= 60:
            _logger.info("waiting for the other ranks: %d %s to go (%.0f s)", len(pending), what,
                         now - t0)
            last_log = now
        time.sleep(max(0.0, min(poll_s, timeout_s - (now - last_new))))
        still = [i for i in pending if not done(i)]
        if len(still) < len(pending):
            last_new = time.monotonic()
        pending = still


def rank_suffix(rank: Optional[int] = None) -> str:
    rank = get_rank() if rank is None else rank
    return f"rank {rank}/{get_world_size()}"
