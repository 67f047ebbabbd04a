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
* A dead peer (a node that lost power or network, a process killed or frozen) is found by a
  heartbeat, not by the process-group timeout: every rank of a training process group bumps a
  counter in the launcher's key-value store every few seconds from a background thread, and
  watches the others'. A rank whose counter stands still for ``--peer-timeout`` seconds (default
  :data:`DEFAULT_PEER_TIMEOUT_S`) is lost: every surviving rank prints one line naming it and its
  node and exits (a dead peer used to cost up to ``--dist-timeout``, 2 hours, of idle GPUs). The
  thread beats whatever the main thread does, so long legitimate waits (rank 0 writing a
  checkpoint or checking a dataset, an evaluation) never trip it. A collective that fails
  because a peer vanished (gloo: connection closed) ends in the same line (:func:`failure_message`).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence


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
# A peer whose heartbeat stands still this long is taken for dead: a dead peer is found within
# DEFAULT_PEER_TIMEOUT_S + one beat (about 3 minutes), far below DEFAULT_TIMEOUT_S.
DEFAULT_PEER_TIMEOUT_S = 180.0

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


def _seconds_or_off(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def add_peer_timeout_arg(parser: argparse.ArgumentParser) -> None:
    """--peer-timeout, for the entry points that train in a process group."""
    parser.add_argument(
        "--peer-timeout", "--peer_timeout", dest="peer_timeout", type=_seconds_or_off,
        default=DEFAULT_PEER_TIMEOUT_S,
        help=f"under torchrun, seconds without a heartbeat from another process (a dead or "
             f"frozen node) after which every surviving process stops with an error naming it "
             f"(default {DEFAULT_PEER_TIMEOUT_S:.0f}; 0 = off: then only --dist-timeout bounds "
             f"the wait). Long waits of a live process (checkpoints, checks) never trip it")


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


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                     peer_timeout_s: float = 0.0) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL for CUDA
    devices, gloo for the CPU. ``device`` comes from utils.device.resolve_device.
    ``peer_timeout_s`` > 0 starts the heartbeat (see the module docstring)."""
    if launched_world_size() <= 1 or is_dist():
        return
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be positive, got {timeout_s}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the rank to its GPU (no guessing in barriers)
    dist.init_process_group(**kwargs)
    if peer_timeout_s > 0:
        start_heartbeat(peer_timeout_s)


# ------------------------------------------------------------------------------------------------
# the heartbeat: a dead peer found in minutes, not after --dist-timeout
# ------------------------------------------------------------------------------------------------
class Heartbeat(threading.Thread):
    """Bumps this rank's counter in the launcher's store every ``interval`` seconds and watches
    the other ranks'; one whose counter stands still for ``timeout`` seconds is lost (see the
    module docstring). Counters, not clocks: the nodes' clocks need not agree. A rank that ends
    normally marks itself done first, so a peer that finished is never taken for a dead one."""

    def __init__(self, store, rank: int, world: int, timeout: float, interval: float,
                 on_lost: Callable[[str], None]):
        super().__init__(name="eps-heartbeat", daemon=True)
        self.store, self.rank, self.world = store, rank, world
        self.timeout, self.interval, self.on_lost = timeout, interval, on_lost
        self.stopped = threading.Event()
        self.seen: Dict[int, tuple] = {}   # rank -> (counter, local time it last changed)
        self.store_ok = time.monotonic()
        # torchrun starts workers in sessions of their own: a launcher killed with -9 would
        # leave this process training alone; an orphan stops at its next beat
        self.parent = os.getppid()
        self.host = f"{socket.gethostname()} (node {int(os.environ.get('GROUP_RANK', '0'))})"
        store.set(f"host/{rank}", self.host)
        store.add(f"beat/{rank}", 1)

    def where(self, rank: int) -> str:
        try:
            if self.store.check([f"host/{rank}"]):
                return self.store.get(f"host/{rank}").decode()
        except Exception:  # noqa: BLE001 - the name is a courtesy
            pass
        return "its node"

    def lost(self) -> Optional[str]:
        """One poll: the description of a lost peer, or None."""
        now = time.monotonic()
        if os.getppid() != self.parent:
            return f"the launcher of this process (torchrun, pid {self.parent}) is gone"
        try:
            self.store.add(f"beat/{self.rank}", 1)
            for r in range(self.world):
                if r == self.rank or self.store.check([f"done/{r}"]):
                    continue
                count = self.store.add(f"beat/{r}", 0)
                last = self.seen.get(r)
                if last is None or count != last[0]:
                    self.seen[r] = (count, now)
                elif now - last[1] > self.timeout:
                    return (f"lost rank {r} on {self.where(r)}: no heartbeat for "
                            f"{now - last[1]:.0f} s (--peer-timeout {self.timeout:g})")
            self.store_ok = now
        except Exception as e:  # noqa: BLE001 - the store lives on node 0's launcher
            if now - self.store_ok > self.timeout:
                addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                return (f"lost node 0: its launcher's store at {addr} has not answered for "
                        f"{now - self.store_ok:.0f} s ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})")
        return None

    def run(self):
        while not self.stopped.wait(self.interval):
            why = self.lost()
            if why is not None and not self.stopped.is_set():
                self.on_lost(why)
                return

    def finish(self) -> None:
        self.stopped.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the others will see the beat stop instead
            pass


_heartbeat: Optional[Heartbeat] = None


def _exit_lost(why: str) -> None:
    """A peer is gone: one line (as run_cli prints errors), into the run's log too, and out,
    whatever the main thread is blocked in (a collective that would wait --dist-timeout)."""
    prog = os.path.basename(sys.argv[0]) or "python"
    line = (f"{prog}: error: [rank {get_rank()}] {why}; every surviving process stops. Check "
            f"that node (a crash, a killed or frozen process, the network), then rerun the same "
            f"command: training resumes from its last checkpoint\n")
    _logger.error("%s", line.strip(), extra={"console": False})
    try:
        os.write(2, line.encode(errors="backslashreplace"))
    finally:
        logging.shutdown()
        os._exit(2)


def start_heartbeat(timeout_s: float, interval_s: Optional[float] = None,
                    on_lost: Callable[[str], None] = _exit_lost) -> Optional[Heartbeat]:
    """Start this rank's heartbeat in the store of the torchrun launch (MASTER_ADDR /
    MASTER_PORT); without one (another launcher), say so and run without it."""
    global _heartbeat
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        _logger.info("no MASTER_ADDR/MASTER_PORT: no heartbeat (a dead peer is found after "
                     "--dist-timeout)")
        return None
    interval = interval_s or max(0.5, min(10.0, timeout_s / 6))
    store = dist.TCPStore(addr, int(port), is_master=False,
                          timeout=datetime.timedelta(seconds=max(5.0, interval * 2)))
    prefix = f"eps_heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
             f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    _heartbeat = Heartbeat(dist.PrefixStore(prefix, store), get_rank(), get_world_size(),
                           timeout_s, interval, on_lost)
    _heartbeat.start()
    return _heartbeat


def failure_message(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because a peer vanished (gloo: 'Connection reset
    by peer'; NCCL: a timeout or an aborted communicator), naming the lost rank when the
    heartbeat can tell within a few beats; None for any other exception (it keeps its
    traceback: a local error is not a lost peer)."""
    if not is_dist() and _heartbeat is None:
        return None
    text = f"{type(exc).__name__}: {exc}"
    peer = ("Connection closed by peer", "Connection reset", "Broken pipe", "Connection refused")
    other = ("Timed out", "timed out", "NCCL", "DistBackendError", "DistNetworkError",
             "DistStoreError")
    if not any(m in text for m in peer + other):
        return None
    first = (str(exc).strip().splitlines() or [""])[-1]
    first = first.rsplit("] ", 1)[-1].split(". ")[0][:160]  # the gist, without torch's source path
    hb = _heartbeat
    if hb is not None:
        hb.stopped.set()
        deadline = time.monotonic() + max(3 * hb.interval, 2.0)
        hb.timeout = min(hb.timeout, 2 * hb.interval)  # who stops beating, quickly
        while time.monotonic() < deadline:
            why = hb.lost()
            if why is not None:
                return f"{why.split(':')[0]}: a collective failed ({first})"
            time.sleep(hb.interval / 2)
    if any(m in text for m in peer):
        return f"lost contact with another process: a collective failed ({first})"
    return None


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
    global _heartbeat
    if _heartbeat is not None:  # done: the others must not take this rank's silence for death
        _heartbeat.finish()
        _heartbeat = None
    if is_dist():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` under torchrun, the model itself otherwise."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
