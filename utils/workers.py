"""Worker processes that never outlive their parent.

A ``kill -9`` of ``infer.py --crf`` used to leave its CRF writers (about 700 MB each) and
multiprocessing's resource tracker running for minutes: a killed parent runs no clean-up, so its
children are never told. Here every pool worker asks the kernel to send it SIGKILL when its
parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), so the whole tree goes down together; the
resource tracker then sees its last client gone and exits too.

DataLoader workers need the same (:func:`loader_worker_init`): torch's worker notices a dead
parent only between batches (torch/utils/data/_utils/worker.py, ManagerWatchdog), and one that
is blocked handing over a batch nobody reads never gets there. It stayed alive after a kill -9,
and so did the resource tracker, whose pipe it had inherited.

Pools are started with ``spawn``: forking a process that has initialised CUDA or NCCL copies
their threads' locks in an undefined state (the children can hang). The one exception is
:func:`mp_pool` with ``fork_if_safe``: a Linux process that never imported torch and runs a single
thread (evaluate.py) has no such state, and a forked worker starts in milliseconds where a spawned
one pays a fresh interpreter and its imports (about 0.25 s of CPU each).
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int = 0) -> None:
    """Pool initializer: SIGKILL this process when its parent exits (Linux; a no-op elsewhere).
    ``parent_pid`` closes the race of a parent that died before the call."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid and os.getppid() != parent_pid:  # the parent is already gone
        os.kill(os.getpid(), signal.SIGKILL)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawned process pool whose workers die with this process."""
    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def fork_is_safe() -> bool:
    """Whether forking this process is safe: Linux, torch never imported (so no CUDA, NCCL or
    OpenMP runtime threads), and no thread but this one (a lock held by another thread at fork
    time would stay locked in the child)."""
    return (sys.platform.startswith("linux") and "torch" not in sys.modules
            and threading.active_count() == 1)


def mp_pool(workers: int, fork_if_safe: bool = False):
    """A ``multiprocessing.Pool`` (for ``imap_unordered``) whose workers die with this process:
    spawned, or forked when ``fork_if_safe`` and :func:`fork_is_safe`."""
    method = "fork" if fork_if_safe and fork_is_safe() else "spawn"
    return mp.get_context(method).Pool(max(1, workers), initializer=die_with_parent,
                                       initargs=(os.getpid(),))


def executor(workers: int, processes: bool):
    """Threads (the default: zlib / PNG encoding releases the GIL) or processes (for work that
    holds the GIL, such as pydensecrf's ~1 s per image)."""
    return process_pool(workers) if processes else ThreadPoolExecutor(max_workers=max(1, workers))


def _loader_worker_init(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def loader_worker_init() -> functools.partial:
    """A DataLoader ``worker_init_fn`` that makes each worker die with this process."""
    return functools.partial(_loader_worker_init, os.getpid())
