"""Measurement shared by the benchmark sections: which devices a run covers, synchronised timing,
peak memory.

Timing. CUDA kernels are queued asynchronously, so a host clock read means nothing unless the
device is synchronised at both ends of the interval; the first calls of a shape also pay for
the CUDA context, cuBLAS/cuDNN handles, cuDNN autotuning (``--cudnn-benchmark``) and the caching
allocator's growth. Every CUDA row therefore runs ``CUDA_WARMUP`` untimed calls, then at least
``CUDA_REPS`` calls each bracketed by ``torch.cuda.synchronize``, and reports the median (the
row's number) and the minimum. On the CPU a full-size ResNet-38 call takes tens of seconds on
2 cores, so CPU rows use fewer repetitions; every row states how many (``reps``).

Peak memory of a window (:class:`PeakMemory`):
* CUDA: ``max_memory_allocated`` above what was allocated when the window opened (tensors),
  and ``max_memory_reserved`` above what was reserved then (what the caching allocator took
  from the device: the number that decides whether a run fits a GPU). The CUDA context and
  library workspaces are outside both: :func:`cuda_overhead_mb` measures them once.
* CPU: growth of the process's peak resident set (VmHWM, reset by writing 5 to
  /proc/self/clear_refs, Linux >= 4.0) above the resident set when the window opened; None
  where the kernel does not allow the reset.
"""
from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

CUDA_WARMUP = 2
CUDA_REPS = 5          # the least any CUDA row runs; sections may run more
MB = 2 ** 20


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
def bench_devices(choice: str) -> List[torch.device]:
    """The devices of ``--device cpu | cuda | all``: CPU rows only for cpu/all, CUDA rows only for
    cuda/all. ``cuda`` without a usable GPU is a DeviceError (one line, utils.device); ``all``
    then runs the CPU rows only (the report header says why there is no CUDA)."""
    from utils.device import cuda_problem, resolve_device

    devices = []
    if choice in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if choice == "cuda":
        devices.append(resolve_device("cuda"))
    elif choice == "all" and cuda_problem() is None:
        devices.append(resolve_device("cuda"))
    return devices


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU seconds of all threads of this process (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_cuda(device: torch.device) -> None:
    """Return cached blocks to the device, so that the next row's reservation starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_overhead_mb(device: torch.device) -> Optional[float]:
    """Device memory in use that the caching allocator does not account for (CUDA context, cuBLAS
    and cuDNN workspaces, other processes): used - reserved. Add it to a row's reserved peak to
    judge whether a run fits a smaller GPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / MB


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------
def _status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) of this process to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.alloc_mb`` (CUDA tensors / CPU resident
    set growth) and ``pm.reserved_mb`` (CUDA only): peaks above the state at ``__enter__``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.alloc_mb: Optional[float] = None
        self.reserved_mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._alloc0 = torch.cuda.memory_allocated(self.device)
            self._reserved0 = torch.cuda.memory_reserved(self.device)
        else:
            self._rss0 = _status_mb("VmRSS") if _reset_hwm() else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.alloc_mb = (torch.cuda.max_memory_allocated(self.device) - self._alloc0) / MB
            self.reserved_mb = (torch.cuda.max_memory_reserved(self.device) - self._reserved0) / MB
        elif self._rss0 is not None:
            hwm = _status_mb("VmHWM")
            self.alloc_mb = None if hwm is None else hwm - self._rss0
        return False


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall seconds of each timed call (``times``) and CPU seconds of this process for each."""
    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)
    result: object = None

    @property
    def reps(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    def add(self, fn: Callable, device: torch.device) -> None:
        """One call of ``fn`` between two device synchronisations; keeps its result."""
        sync(device)
        w0, c0 = time.perf_counter(), cpu_seconds()
        self.result = fn()
        sync(device)
        self.times.append(time.perf_counter() - w0)
        self.cpu_times.append(cpu_seconds() - c0)


def time_calls(fn: Callable, device: torch.device, warmup: int, reps: int,
               memory: bool = True):
    """``warmup`` untimed calls, then ``reps`` synchronised timed calls of ``fn``; returns
    (Timing, PeakMemory over the timed calls, or None when ``memory`` is False)."""
    for _ in range(warmup):
        fn()
    sync(device)
    timing = Timing()
    if not memory:
        for _ in range(reps):
            timing.add(fn, device)
        return timing, None
    with PeakMemory(device) as peak:
        for _ in range(reps):
            timing.add(fn, device)
    return timing, peak


def oom_errors() -> tuple:
    """The exceptions of a CUDA out-of-memory (a row that does not fit is reported, not fatal)."""
    return (torch.cuda.OutOfMemoryError,)


# ------------------------------------------------------------------------------------------------
# what the numbers were measured on
# ------------------------------------------------------------------------------------------------
def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver version from nvidia-smi (torch does not report it), or None."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def cuda_environment() -> dict:
    """GPUs, driver and library versions as plain values (JSON); {"cuda": None, "why": ...}
    when CUDA cannot be used by this process."""
    from utils.device import cuda_problem

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    problem = cuda_problem()
    if problem is not None:
        env.update(cuda=None, why=problem)
        return env
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_mib": round(p.total_memory / MB),
                     "multiprocessors": p.multi_processor_count})
    env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               driver=nvidia_driver(), gpus=gpus, nccl=_nccl_version())
    return env


def _nccl_version() -> Optional[str]:
    try:
        if not torch.distributed.is_nccl_available():
            return None
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    except Exception:  # noqa: BLE001 - a build without distributed / NCCL support
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
