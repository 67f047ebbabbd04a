"""The device a process runs on, and its numerics, decided once and honestly.

* ``--device cuda`` (what the pipeline scripts pass when ``NGPUS >= 1``) never falls back to the
  CPU: a missing or unusable CUDA is a :class:`DeviceError` that says why (a CPU-only torch
  build, no driver or a driver too old for this build's CUDA, no GPU visible, a GPU
  architecture the build has no kernels for, fewer GPUs than processes).
* ``--device auto`` uses CUDA when it works; when it does not although the machine seems to have
  an NVIDIA GPU, it says so in a warning before running on the CPU. Under a launcher with more
  than one process (torchrun, WORLD_SIZE > 1) it never falls back: N processes on a GPU machine
  meant N GPUs, and N CPU processes sharing the cores behind a warning cost hours. There it is a
  :class:`DeviceError`; ``--device cpu`` asks for the CPU.
* TF32 and ``cudnn.benchmark`` are explicit flags (:func:`add_numerics_args`), and the effective
  settings are returned for ``env.json``. bf16 autocast on a GPU without native bf16 is refused.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
from typing import Dict, List, Optional

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

# The install section of the README, named in every CUDA error.
INSTALL_HINT = "see the README section 'GPUs and clusters' for the torch build that fits your driver"


class DeviceError(UserError):
    """The requested device cannot be used; the message says why and what to do."""


def gpu_present() -> bool:
    """Whether the machine looks like it has an NVIDIA GPU (device nodes or a CUDA_VISIBLE_DEVICES
    setting), independently of whether this torch build can use it."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def cuda_problem() -> Optional[str]:
    """Why CUDA cannot be used by this process, or None when it can."""
    if torch.version.cuda is None:
        return (f"this torch {torch.__version__} is a CPU-only build; install a CUDA build "
                f"({INSTALL_HINT})")
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - torch's own reason is the message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "too old" in reason or "insufficient" in reason:
            return (f"the NVIDIA driver is too old for this torch build (CUDA {torch.version.cuda}): "
                    f"{reason}; update the driver or {INSTALL_HINT}")
        return f"CUDA is not usable: {reason} ({INSTALL_HINT})"
    n = torch.cuda.device_count()
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("no GPU is visible to this process"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
    arch = torch.cuda.get_arch_list()
    for i in range(n):
        cap = torch.cuda.get_device_capability(i)
        if arch and not arch_supported(cap, arch):
            return (f"GPU {i} ({torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}) is not "
                    f"supported by this torch build (kernels for {', '.join(arch)}); {INSTALL_HINT}")
    return None


def arch_supported(capability, arch_list) -> bool:
    """Whether a build with ``arch_list`` (torch.cuda.get_arch_list(): 'sm_XY' kernels and
    'compute_XY' PTX) runs on a GPU of ``capability`` (major, minor): a kernel for the same
    major and a minor at most the GPU's, or PTX for an older or equal capability."""
    major, minor = capability
    for a in arch_list:
        kind, _, num = a.partition("_")
        if not num.isdigit() or len(num) < 2:
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """The torch.device of this process for ``--device`` auto | cpu | cuda (see the module doc)."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice not in ("auto", "cuda"):
        raise DeviceError(f"--device must be auto, cpu or cuda, got {choice!r}")
    problem = cuda_problem()
    if problem is not None:
        if choice == "cuda":
            raise DeviceError(f"--device cuda: {problem}; or run on the CPU with --device cpu "
                              f"(DEVICE=cpu for the scripts)")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise DeviceError(f"--device auto under a launcher with {world} processes needs "
                              f"CUDA: {problem}; pass --device cpu to run the {world} processes "
                              f"on the CPU (gloo), or fix CUDA")
        if gpu_present():
            logger.warning("--device auto runs on the CPU although this machine seems to have a "
                           "GPU: %s", problem)
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"process {local_rank} of this node needs GPU {local_rank}, but only "
                          f"{torch.cuda.device_count()} are visible; lower NGPUS / --nproc_per_node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def add_numerics_args(parser: argparse.ArgumentParser, *, cudnn_benchmark: bool,
                      published: str) -> None:
    """--tf32 and --cudnn-benchmark, with the stage's published default for cudnn.benchmark."""
    parser.add_argument(
        "--tf32", action=argparse.BooleanOptionalAction, default=False,
        help="allow TF32 in cuDNN convolutions and matmuls on Ampere and newer GPUs (faster, "
             "~1e-3 relative error). Default off: strict fp32, the arithmetic of the published "
             "runs, which predate TF32 GPUs (torch 2.14 alone would use TF32 for convolutions)")
    parser.add_argument(
        "--cudnn-benchmark", "--cudnn_benchmark", dest="cudnn_benchmark",
        action=argparse.BooleanOptionalAction, default=cudnn_benchmark,
        help=f"let cuDNN time its algorithms for each input shape (faster for fixed crops; "
             f"picks may differ run to run). Published: {published}")


def configure_numerics(device: torch.device, *, tf32: bool = False, cudnn_benchmark: bool = False,
                       amp: Optional[str] = None) -> Dict[str, object]:
    """Apply the numerics settings and return what is in effect (for env.json). ``amp``: None,
    'off', 'bf16' or 'fp16'. Refuses bf16 on a GPU without native bf16 (it would be emulated,
    several times slower)."""
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    problem = amp_problem(device, amp)
    if problem is not None:
        raise DeviceError(problem)
    info: Dict[str, object] = dict(device=str(device), tf32=bool(tf32) and device.type == "cuda",
                                   cudnn_benchmark=bool(cudnn_benchmark) and device.type == "cuda",
                                   amp=amp or "off")
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def amp_problem(device: torch.device, amp: Optional[str]) -> Optional[str]:
    """Why ``--amp`` cannot run on ``device`` (one line with the fix), or None: fp16 needs CUDA,
    bf16 on a GPU needs native bfloat16 (compute capability 8.0+; emulated it is several times
    slower). Used by configure_numerics and, for every GPU of the node, by tools/preflight.py."""
    if amp == "fp16" and device.type != "cuda":
        return "--amp fp16 needs a CUDA device; use --amp bf16 on the CPU, or --amp off"
    if amp == "bf16" and device.type == "cuda" and not _native_bf16(device):
        name = torch.cuda.get_device_name(device)
        return (f"--amp bf16: {name} has no native bfloat16 (it needs compute capability 8.0, "
                f"Ampere, or newer) and would run it emulated; use --amp fp16 or --amp off")
    return None


def numerics_problems(choice: str, amp: Optional[str], gpus: int = 1) -> List[str]:
    """amp_problem for the device ``--device choice`` resolves to, on each of the first ``gpus``
    GPUs (a node's processes each take one), without a process group or a model."""
    if amp in (None, "off"):
        return []
    if choice == "cpu" or (choice == "auto" and cuda_problem() is not None):
        devices = [torch.device("cpu")]
    elif cuda_problem() is not None:
        return []  # the device check names the reason
    else:
        devices = [torch.device("cuda", i) for i in range(min(gpus, torch.cuda.device_count()))]
    problems, seen = [], set()
    for d in devices:
        p = amp_problem(d, amp)
        if p is not None and p not in seen:
            seen.add(p)
            problems.append(p if d.type == "cpu" else f"GPU {d.index}: {p}")
    return problems


def _native_bf16(device: torch.device) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag; fall back to the capability
        return torch.cuda.get_device_capability(device)[0] >= 8


def pin_memory(device: torch.device) -> bool:
    """Pinned host memory only helps copies to a GPU; on the CPU it would open a CUDA context in
    every process of a CUDA build for nothing."""
    return device.type == "cuda"


# DataLoader workers hand batches to the main process through /dev/shm. Docker's default of
# 64 MB is a bus error at the first batch of a 448-px training run (about 0.4 GB in flight per
# rank with 8 workers).
SHM_PER_WORKER_MB = 64


def check_shared_memory(num_workers: int, path: str = "/dev/shm") -> None:
    """Refuse, with the fix, a /dev/shm too small for ``num_workers`` DataLoader workers in each
    of the processes torchrun started on this machine (they all share one /dev/shm)."""
    if num_workers <= 0 or not os.path.isdir(path):
        return
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    free_mb = shutil.disk_usage(path).free / 2 ** 20
    need_mb = SHM_PER_WORKER_MB * num_workers * procs
    if free_mb < need_mb:
        who = (f"{num_workers} data-loading workers" if procs == 1 else
               f"{procs} processes x {num_workers} data-loading workers")
        raise DeviceError(
            f"{path} has {free_mb:.0f} MB free, but {who} need about {need_mb} MB (a "
            f"container's default 64 MB ends in a bus error): start the container with "
            f"--shm-size=8g or --ipc=host, or pass --num-workers 0")
