"""Run directories and logging: every entry point records what it ran with.

A run directory holds ``args.json`` (all flags), ``env.json`` (git commit, dirty flag, torch
version, hostname, command line), ``log.txt`` (the ``logging`` output) and, for training,
``metrics.jsonl`` (one JSON object per logging interval) and checkpoints."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from utils.io import atomic_write_text, write_errors
from utils.dist import is_main_process
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_info() -> dict:
    """Commit sha and dirty flag of the code being run (``None`` outside a git checkout)."""
    def _git(*a):
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        sha = _git("rev-parse", "HEAD") or None
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    return {"git_commit": sha, "git_dirty": dirty}


class _StderrHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stderr`` as it is when a record is emitted, not as it
    was when the handler was made: code that swaps stderr (pytest's capture, a notebook, a
    caller's redirect) then never gets a handler on a closed stream ("--- Logging error ---")."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ and setStream assign it; stderr is read live
        pass


def setup_logging(log_file: Optional[Path] = None, level=logging.INFO) -> None:
    """Log to stderr (all ranks print warnings; rank 0 prints info) and, on rank 0, to log_file."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    main = is_main_process()
    if not any(getattr(h, "_eps_console", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(fmt)
        h.setLevel(level if main else logging.WARNING)
        h.addFilter(lambda record: getattr(record, "console", True))  # see utils.cli.report_error
        h._eps_console = True
        root.addHandler(h)
    if log_file is not None and main:
        log_file = Path(log_file)
        if not any(getattr(h, "baseFilename", None) == str(log_file.resolve()) for h in root.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
            fh.setFormatter(fmt)
            root.addHandler(fh)


def write_run_info(run_dir, args, **extra) -> None:
    """Write args.json and env.json into run_dir (rank 0 only). ``extra`` goes into env.json
    (e.g. numerics=utils.device.configure_numerics(...): device, TF32, cudnn.benchmark, AMP)."""
    if not is_main_process():
        return
    import torch

    from utils.dist import launched_world_size
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "args.json",
                      json.dumps(vars(args), indent=2, sort_keys=True, default=str) + "\n")
    env = dict(git_info(), torch=torch.__version__, python=platform.python_version(),
               host=platform.node(), command=" ".join(sys.argv),
               world_size=launched_world_size(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
               **extra)
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2, default=str) + "\n")


def close_file_log(path) -> None:
    """Stop logging into ``path`` (in-process callers such as tests and pipelines must not keep
    writing one run's log.txt from the next run)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "baseFilename", None) == str(Path(path).resolve()):
            root.removeHandler(h)
            h.close()


def check_writable(path, flag: str) -> None:
    """Refuse, before any compute, an output folder that cannot be created or written."""
    path = Path(path).resolve()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {path}: {existing} is not writable by this user; choose "
                          f"another {flag} or fix the folder's permissions")
    # os.access says yes to root everywhere, and knows nothing of pseudo file systems (/proc,
    # /sys) or of a full disk's inodes: create (and remove) one empty file to be sure
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=existing)
    except OSError as e:
        raise RunDirError(f"{flag} {path}: cannot create files in {existing} ({e.strerror}); "
                          f"choose another {flag} or fix the folder's permissions") from None
    os.close(fd)
    os.unlink(probe)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set on the CPU."""
    if getattr(device, "type", device) == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class JsonlLogger:
    """Append-only JSON-lines metrics file (rank 0 only); each record is flushed immediately.
    ``mirror``: an object whose ``scalars(record)`` gets every record too (--tensorboard's
    utils/tensorboard.Board), so the event files hold exactly what metrics.jsonl holds."""

    def __init__(self, path, mirror=None):
        self.path = Path(path)
        self.enabled = is_main_process()
        self.mirror = mirror

    def trim(self, upto: int) -> None:
        """Keep the records up to iteration ``upto`` (a run resumed from that iteration), none
        for a fresh start: a killed run may have logged past its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        if upto <= 0:
            self.path.unlink()
        else:
            trim_metrics(self.path, upto)

    def log(self, **record) -> None:
        if not self.enabled:
            return
        with write_errors(self.path.parent, self.path.name):  # a full disk: one line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self.mirror is not None:
            self.mirror.scalars(record)


class RunDirError(UserError):
    """A run directory cannot be (re)used as asked; the message says what to do."""


def resolve_resume(run_dir, resume, final_name: str, last_name: str,
                   dir_flag: str = "--run-dir") -> Optional[Path]:
    """Decide how a training run starts in ``run_dir``.

    Never overwrites: without ``resume`` an existing finished (``final_name``) or unfinished
    (``last_name``) run is an error. ``resume == "auto"`` continues from ``last_name`` if present;
    any other value is an explicit checkpoint path. Returns the checkpoint to resume from, or None
    for a fresh start."""
    run_dir = Path(run_dir)
    final, last = run_dir / final_name, run_dir / last_name
    if resume is None:
        if final.exists():
            raise RunDirError(f"{run_dir} already holds a finished run ({final}); choose another "
                              f"{dir_flag}, or pass --resume to continue it")
        if last.exists():
            raise RunDirError(f"{run_dir} holds an unfinished run ({last}); pass --resume to "
                              f"continue it, or choose another {dir_flag}")
        return None
    if resume == "auto":
        if last.exists():
            return last
        if final.exists():
            raise RunDirError(f"{final} exists but {last} does not: the run finished without a "
                              f"resumable state; choose another {dir_flag}")
        logging.getLogger(__name__).warning("--resume: no %s yet, starting from scratch", last)
        return None
    path = Path(resume)
    if not path.is_file():
        raise RunDirError(f"--resume {path}: file not found")
    return path


def trim_metrics(path, upto: int) -> None:
    """Drop metrics records after iteration ``upto`` (written after the last checkpoint by a run
    that died), so a resumed log holds each iteration once."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iter", 0) <= upto]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
