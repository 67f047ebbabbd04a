"""Evaluate folders of label PNGs: parallel decoding, one bincount per image, summed confusion.

``evaluate_folders(ids, gt_paths, pred_paths, num_classes, workers)`` is the Python entry point
used by ``evaluate.py`` (and by any stage that wants an mIoU without a subprocess). Work is split
into chunks of ids; each worker process decodes its chunk and returns ONE summed confusion matrix,
so inter-process traffic is one small array per chunk, not per image.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval.metrics import compute_scores, confusion_matrix
from utils.errors import UserError
from utils.progress import is_terminal
from utils.workers import mp_pool

logger = logging.getLogger(__name__)

# PIL modes whose pixel values are the class indices (palette index / grey level / integer).
_LABEL_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B")


class EvalError(UserError):
    """Bad evaluation input; the message names the file and the fix."""


def read_label_png(path) -> np.ndarray:
    """Read a single-channel label PNG as its raw values (palette indices for VOC-palette PNGs,
    exactly what ``np.array(Image.open(p))`` gives in the published script)."""
    try:
        with Image.open(path) as img:
            if img.mode not in _LABEL_MODES:
                raise EvalError(
                    f"{path}: label image has mode {img.mode!r}; expected a single-channel PNG whose "
                    f"values are class indices (palette 'P' or grey 'L'), not a colour rendering")
            arr = np.asarray(img)
    except EvalError:
        raise
    except FileNotFoundError:
        raise EvalError(f"{path}: file not found") from None
    except OSError as e:  # truncated / not an image
        raise EvalError(f"{path}: cannot decode image ({e}); re-create the file") from None
    return arr


def check_size(gt: np.ndarray, other_shape: Tuple[int, ...], gt_path, other_path, what: str) -> None:
    """Different sizes are an error: the published script silently crops the prediction to the GT
    box, which hides resizing bugs and mismatched folders."""
    if gt.shape != tuple(other_shape):
        raise EvalError(
            f"{other_path}: {what} size {other_shape[1]}x{other_shape[0]} (WxH) differs from the "
            f"ground truth {gt_path} ({gt.shape[1]}x{gt.shape[0]}); the {what} must be produced at the "
            f"original image size (is --gt_dir / --pred_dir pointing at the right folders?)")


def split_missing(ids: Sequence[str], gt_paths: Sequence, other_paths: Sequence, what: str,
                  skip_missing: bool, flag_hint: str = "--skip-missing"):
    """Check that every file exists before any work starts.

    Returns (kept_ids, kept_gt, kept_other, missing) where missing is a list of
    {"id", "path", "kind"}; raises EvalError naming the first missing file unless skip_missing."""
    if not (len(ids) == len(gt_paths) == len(other_paths)):
        raise ValueError("ids, gt_paths and prediction paths must have the same length")
    kept_ids, kept_gt, kept_other, missing = [], [], [], []
    for i, g, o in zip(ids, gt_paths, other_paths):
        gone = [(kind, p) for kind, p in (("ground truth", g), (what, o)) if not os.path.isfile(p)]
        if gone:
            missing += [{"id": i, "path": str(p), "kind": kind} for kind, p in gone]
        else:
            kept_ids.append(i)
            kept_gt.append(g)
            kept_other.append(o)
    if missing and not skip_missing:
        n_gt = sum(m["kind"] == "ground truth" for m in missing)
        first = missing[0]
        hint = ("check --gt_dir / --data-root and the id list" if first["kind"] == "ground truth"
                else f"produce the missing {what} files first (e.g. finish infer.py)")
        raise EvalError(
            f"{first['path']}: {first['kind']} file of id {first['id']!r} not found "
            f"({len(missing) - n_gt} {what} and {n_gt} ground-truth files missing out of {len(ids)} ids); "
            f"{hint}, or pass {flag_hint} to evaluate the remaining ids and report the count")
    if missing:
        logger.warning("%d files missing (%d ids skipped), e.g. %s", len(missing),
                       len(ids) - len(kept_ids), missing[0]["path"])
    return kept_ids, kept_gt, kept_other, missing


def default_workers() -> int:
    """Worker processes: the usable cores, at most 8 (PNG decoding saturates disks beyond that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# A spawned worker costs about 0.25 s of start-up (a fresh interpreter importing the evaluator's
# modules, numpy and PIL; torch is kept out of them) and repays it only when its share of the list
# takes longer than that. Per item on one core of the development machine: a VOC-size PNG pair
# 1.0-2.1 ms, one CAM .npz swept over 19 thresholds 10-20 ms. With W workers on W idle cores the
# pool wins when n x per-item x (1 - 1/W) > start-up: for 2 workers from about 250-500 PNG pairs
# or 25-50 CAMs. Each worker therefore gets at least this many items, and a shorter list runs in
# this process. evaluate.py's workers are forked (utils/workers.py mp_pool), which costs milliseconds,
# so there the thresholds are conservative: what decides is whether idle cores exist (on the
# shared 2-core development machine, with other jobs running, 2 workers gave no gain at 1,449).
PNG_ITEMS_PER_WORKER = 250
CAM_ITEMS_PER_WORKER = 50


def pool_size(workers: int, n_items: int, min_per_worker: int = 1) -> int:
    """Worker processes worth starting for ``n_items``: at most ``workers``, each with at least
    ``min_per_worker`` items. 0 or 1 means: run in this process."""
    return max(0, min(int(workers), n_items // max(1, int(min_per_worker))))


def run_chunked(fn: Callable, items: Sequence, workers: int, desc: str,
                progress: bool = True, min_per_worker: int = 1) -> Iterable:
    """Apply ``fn(chunk) -> (result, n_items)`` to chunks of ``items`` and yield the results.

    Up to ``workers`` processes, but only as many as get ``min_per_worker`` items each
    (:func:`pool_size`); one or none runs in this process (easy to debug, no start-up cost).
    Otherwise a process pool with ``imap_unordered`` over chunks (sums are order independent).
    ``fn`` must be picklable (a module-level function or a functools.partial of one). Worker
    errors re-raise here."""
    items = list(items)
    if not items:
        return
    requested = max(0, int(workers))
    workers = pool_size(requested, len(items), min_per_worker)
    if requested > 1 and workers <= 1:
        logger.info("%s: %d items, too few to repay worker start-up (%d per worker): running in "
                    "this process", desc, len(items), min_per_worker)
    # About 8 chunks per worker balances the load; at most 32 items so the bar moves.
    size = max(1, min(32, math.ceil(len(items) / (max(1, workers) * 8))))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with contextlib.ExitStack() as stack:
        # The pool first: forked when this process is torch-free and single-threaded
        # (evaluate.py), which the progress bar's monitor thread would no longer be; a forked
        # worker costs milliseconds instead of a fresh interpreter (utils/workers.py).
        pool = (stack.enter_context(mp_pool(min(workers, len(chunks)), fork_if_safe=True))
                if workers > 1 else None)
        # A bar only on a terminal: in a log file it is carriage-return noise (utils/progress.py).
        bar = stack.enter_context(tqdm(total=len(items), desc=desc, unit="img", leave=False,
                                       disable=not progress or not is_terminal()))
        results = pool.imap_unordered(fn, chunks) if pool is not None else map(fn, chunks)
        for result, done in results:
            bar.update(done)
            yield result


def _confusion_chunk(chunk, num_classes: int):
    """Worker: summed (n, n + 1) confusion of a chunk of (gt_path, pred_path) pairs."""
    total = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for gt_path, pred_path in chunk:
        gt = read_label_png(gt_path)
        pred = read_label_png(pred_path)
        check_size(gt, pred.shape, gt_path, pred_path, "prediction")
        total += confusion_matrix(gt, pred, num_classes)
    return total, len(chunk)


def accumulate_confusion(gt_paths: Sequence, pred_paths: Sequence, num_classes: int,
                         workers: int = 0, progress: bool = True,
                         min_per_worker: int = PNG_ITEMS_PER_WORKER) -> np.ndarray:
    """Summed (n, n + 1) confusion over image pairs (files must exist; see split_missing)."""
    fn = functools.partial(_confusion_chunk, num_classes=int(num_classes))
    total = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    pairs = [(str(g), str(p)) for g, p in zip(gt_paths, pred_paths)]
    for conf in run_chunked(fn, pairs, workers, desc="evaluate", progress=progress,
                            min_per_worker=min_per_worker):
        total += conf
    return total


def evaluate_folders(ids: Sequence[str], gt_paths: Sequence, pred_paths: Sequence,
                     num_classes: int, workers: int = 0, *, skip_missing: bool = False,
                     ignore_invalid: bool = False, progress: bool = True,
                     min_per_worker: int = PNG_ITEMS_PER_WORKER) -> dict:
    """mIoU and friends of prediction PNGs against GT PNGs (one pair per id).

    num_classes counts the background (21 for VOC). ``ignore_invalid`` reproduces the published
    dropping of predictions >= num_classes (default: counted as wrong). ``workers`` processes
    at most, each with at least ``min_per_worker`` pairs (:func:`pool_size`). Returns the
    ``compute_scores`` dict plus ``confusion`` (n, n + 1), ``num_images`` and ``missing``."""
    ids, gt_paths, pred_paths, missing = split_missing(ids, gt_paths, pred_paths, "prediction",
                                                       skip_missing)
    if not ids:
        raise EvalError(f"no image left to evaluate: every id misses a file (first: "
                        f"{missing[0]['path']}); check the prediction and ground-truth folders and "
                        f"the id list")
    conf = accumulate_confusion(gt_paths, pred_paths, num_classes, workers, progress,
                                min_per_worker)
    scores = compute_scores(conf, ignore_invalid=ignore_invalid)
    scores.update(confusion=conf, num_images=len(ids), missing=missing)
    return scores


def paths_in_dir(folder, ids: Sequence[str], suffix: str) -> List[Path]:
    """``folder/<id><suffix>`` for every id (the published layout)."""
    folder = Path(folder)
    return [folder / f"{i}{suffix}" for i in ids]


def resolve_gt_paths(ids: Sequence[str], gt_dir=None, info=None, data_root=None) -> List[Path]:
    """GT paths: ``gt_dir/<id>.png`` when a folder is given (published), else the dataset's own
    layout under data_root (``info.gt_path``: SegmentationClassAug, then SegmentationClass)."""
    if gt_dir is not None:
        return paths_in_dir(gt_dir, ids, ".png")
    if info is None or data_root is None:
        raise EvalError("pass --gt_dir (folder of ground-truth PNGs) or --data-root (dataset root)")
    return [Path(info.gt_path(data_root, i)) for i in ids]
