"""Training state on disk: one format and one restore for both training stages.

``checkpoint_last.pth`` = {"model", "optimizer", "scaler", "iter", "rng" (one entry per rank),
"world_size", "args"}, written atomically by rank 0 with ``torch.save`` and read back with
``weights_only=True`` (everything in it is tensors, numbers, strings, lists and dicts). With the
seeded sampler (utils/sampler.py), restoring it continues a run bitwise: the weights after a
kill and a resume equal those of an uninterrupted run (tests/test_train.py,
tests/test_train_seg.py).
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from utils import dist
from utils.errors import UserError
from utils.io import remove_stale_temps, torch_save
from utils.run import check_writable, resolve_resume

logger = logging.getLogger(__name__)

KEYS = ("model", "optimizer", "scaler", "iter", "rng", "args")


class CheckpointError(UserError):
    """A resume checkpoint that cannot be used; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------
def rng_state() -> Dict:
    """This process's RNG states, as tensors and lists that weights_only loading reads."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: Dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["state"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def json_args(args) -> Dict:
    """argparse values as plain JSON types (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# ------------------------------------------------------------------------------------------------
# how a run starts: fresh, resumed, finished, extended (both training stages)
# ------------------------------------------------------------------------------------------------
class RunStart(NamedTuple):
    resume: Optional[Path]      # the checkpoint a resumed run continues from
    ckpt: Optional[Dict]        # its content (load_training_state)
    start_iter: int
    finished: bool              # the run is complete at --max-iters: nothing to do


def start_run(run_dir: Path, *, resume, final_name: str, last_name: str, expect: Mapping,
              writer: str, max_iters: int, extend: bool, dir_flag: str, iters_flag: str,
              root_flag: Optional[str] = None) -> RunStart:
    """Decide, before anything is built or written, how a training run in ``run_dir`` starts.

    Never overwrites: a finished run is left alone (``--resume`` then does nothing), training it
    further needs ``--extend`` (and keeps its final weights, see :func:`open_run_dir`), and a
    checkpoint beyond ``max_iters`` is refused (its weights would be saved as a shorter run).
    ``dir_flag`` names the flags that choose the folder, ``root_flag`` the one whose folder must
    be writable (default: ``dir_flag``)."""
    resume_path = resolve_resume(run_dir, resume, final_name, last_name, dir_flag=dir_flag)
    check_writable(run_dir, root_flag or dir_flag)
    ckpt = load_training_state(resume_path, expect, writer) if resume_path else None
    start = int(ckpt["iter"]) if ckpt else 0
    if start > max_iters:
        raise CheckpointError(f"--resume {resume_path} is at iteration {start}, beyond "
                              f"{iters_flag} {max_iters}; pass {iters_flag} {start} or more (the "
                              f"run's own value is in {Path(run_dir) / 'args.json'})")
    finished = ckpt is not None and (Path(run_dir) / final_name).exists()
    if finished and start < max_iters and not extend:
        raise CheckpointError(f"{run_dir} finished at iteration {start}; to train it further to "
                              f"{iters_flag} {max_iters} pass --extend (the finished {final_name} "
                              f"is kept), or choose another {dir_flag}")
    if finished and start >= max_iters and dist.is_main_process():
        remove_stale_temps(run_dir, min_age_s=0)
    return RunStart(resume_path, ckpt, start, finished and start >= max_iters)


def open_run_dir(run_dir: Path, final_name: str, start_iter: int) -> None:
    """Create the run directory (rank 0), once every check passed. Only this run writes there,
    so any temporary file is left by a killed predecessor (utils/io.py atomic_path), however
    recent; and an extended run keeps its finished weights as ``<final>_iter<N>.pth``. A
    collective: every rank calls it."""
    if dist.is_main_process():
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir, min_age_s=0)
        final = run_dir / final_name
        if final.exists():
            final.rename(run_dir / f"{final.stem}_iter{start_iter}{final.suffix}")
    dist.barrier()


# ------------------------------------------------------------------------------------------------
# save / load / restore
# ------------------------------------------------------------------------------------------------
def save_training_state(path: Path, *, model_state: Mapping, optimizer, scaler, iteration: int,
                        args, extra: Optional[Dict] = None) -> None:
    """Write the resume checkpoint. A collective: every rank calls it (RNG states are gathered)."""
    states = dist.all_gather_object(rng_state())
    if dist.is_main_process():
        torch_save({"model": model_state, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "iter": int(iteration), "rng": states,
                    "world_size": dist.get_world_size(), "args": json_args(args), **(extra or {})},
                   path)
    dist.barrier()


def load_training_state(path: Path, expect: Mapping[str, object], writer: str) -> Dict:
    """Read a resume checkpoint written by ``writer`` (train.py / train_seg.py) and check that
    its args match ``expect`` (e.g. {"network": "resnet38_eps"}) before anything is built."""
    # The safe reader's messages (utils/torchfile.py): what the file looks like, in one line,
    # never torch's advice to load it with weights_only=False.
    from utils.torchfile import WeightsError, load_torch_file
    try:
        ckpt = load_torch_file(path, resave_hint=f"{writer} never writes such a file")
    except WeightsError as e:
        raise CheckpointError(f"--resume {e} (--resume needs the checkpoint_last.pth that "
                              f"{writer} writes into its run directory)") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in KEYS):
        raise CheckpointError(f"{path} is not a {writer} checkpoint (expected the entries "
                              f"{', '.join(KEYS)}); to start from plain weights use --weights / --init")
    saved = ckpt.get("args", {})
    for key, value in expect.items():
        if saved.get(key) != value:
            raise CheckpointError(f"{path} was written with --{key.replace('_', '-')} "
                                  f"{saved.get(key)}, not {value}; resume with the same setting")
    return ckpt


def restore_training_state(ckpt: Dict, *, model, optimizer, scaler, seed: int) -> int:
    """Load model, optimizer, scaler and this rank's RNG state; returns the iteration.

    * A run resumed on another number of processes gets the same data (the sampler is
      world-size invariant), but its dropout streams are reseeded from (seed, rank, iteration),
      with a warning: the run stays valid, not bitwise equal to an uninterrupted one.
    * The AMP scaler state is only restored when both runs use a scaler (fp16): resuming an
      fp32/bf16 run with --amp fp16 starts a fresh scaler instead of failing."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        logger.info("the checkpoint has no fp16 loss-scaler state (it was not an --amp fp16 run); "
                    "starting a fresh scaler")
    it = int(ckpt["iter"])
    rank, world = dist.get_rank(), dist.get_world_size()
    states: Sequence = ckpt["rng"]
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        logger.warning("the checkpoint was written by %d processes, this run has %d: same data "
                       "order, but the dropout random streams are reseeded", len(states), world)
        torch.manual_seed(seed + 1 + rank + 7919 * it)
    return it


def changed_settings(ckpt: Dict, args, keys: Sequence[str]) -> Dict[str, tuple]:
    """{flag: (checkpoint value, current value)} for the listed settings that differ."""
    old, now = ckpt.get("args", {}), json_args(args)
    return {k: (old.get(k), now.get(k)) for k in keys if k in old and old.get(k) != now.get(k)}


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def weights_digest(model: torch.nn.Module, buffers: bool = True) -> str:
    """sha1 of every parameter (and buffer) bitwise."""
    h = hashlib.sha1()
    items = model.state_dict().items() if buffers else model.named_parameters()
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(model: torch.nn.Module) -> List[str]:
    """DDP keeps the replicas' weights identical (same all-reduced gradients, same updates);
    verify it at the end of a run and log the outcome. Buffers are not compared: BN layers that
    train (the small nets) update their running statistics from each rank's own half of the
    batch, and DDP only re-broadcasts rank 0's before the next forward. Returns the digests."""
    digests = dist.all_gather_object(weights_digest(model, buffers=False))
    if len(set(digests)) == 1:
        logger.info("weights identical on all %d ranks (sha1 %s)", len(digests), digests[0][:12])
    else:
        logger.error("weights differ between ranks: %s", digests)
    return digests
