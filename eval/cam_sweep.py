"""Evaluate saved CAMs directly over a sweep of background thresholds.

CAM file contract (written by infer.py): ``<cam_dir>/<id>.npz`` with ``keys`` int64 (K,) = 0-based
foreground classes of the image label, ``cams`` float32 (K, H, W) = per-class max-normalised CAMs,
and optionally ``bg`` (H, W) for eps heads. The pseudo-mask at threshold t is the published rule
(EPS infer.py): argmax over ``[full(t), cams]`` -> 0 or ``keys[k] + 1``, ties -> background.
The ``bg`` map is not used, as in the published pseudo-masks (its eps branch drops it too).

Each image is decoded once and all thresholds are scored from one bincount
(``eval.metrics.sweep_confusion_matrices``), so a 19-point sweep costs about one evaluation.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

import numpy as np

from eval.evaluator import (CAM_ITEMS_PER_WORKER, EvalError, check_size, read_label_png, run_chunked,
                            split_missing)
from eval.metrics import compute_scores, sweep_confusion_matrices
from utils.io import load_npz


def thresholds_from_range(start: float, stop: float, step: float) -> List[float]:
    """``start, start + step, ...`` up to and including ``stop`` (rounded to 6 decimals so that
    0.1 + 0.2 style float noise does not create 0.30000000000000004 or drop the end point)."""
    if step <= 0:
        raise ValueError(f"threshold step must be > 0, got {step}")
    if stop < start:
        raise ValueError(f"threshold range stop {stop} is below start {start}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    if count > 10000:
        raise ValueError(f"{count} thresholds is too many; use a larger step")
    return [round(start + i * step, 6) for i in range(count)]


def load_cam_file(path, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(keys int64 (K,), cams float (K, H, W)) of one CAM npz, validated; num_classes counts the
    background (keys must lie in 0..num_classes-2)."""
    try:
        data = load_npz(path)
    except FileNotFoundError:
        raise EvalError(f"{path}: CAM file not found") from None
    except Exception as e:  # noqa: BLE001  not a zip / truncated / pickled objects: all "re-create it"
        raise EvalError(f"{path}: cannot read CAM file ({e}); re-run infer.py for this id") from None
    if "keys" not in data or "cams" not in data:
        raise EvalError(f"{path}: CAM file needs arrays 'keys' and 'cams', found {sorted(data)}")
    keys = np.asarray(data["keys"])
    cams = np.asarray(data["cams"])
    if keys.ndim != 1 or cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise EvalError(f"{path}: expected keys (K,) and cams (K, H, W), got {keys.shape} and {cams.shape}")
    if keys.size and (keys.dtype.kind not in "iu" or keys.min() < 0 or keys.max() > num_classes - 2):
        raise EvalError(f"{path}: CAM keys {keys.tolist()} must be 0-based foreground class indices "
                        f"0..{num_classes - 2} (is --dataset right?)")
    if cams.dtype.kind != "f":
        raise EvalError(f"{path}: cams must be floating point, got {cams.dtype}")
    if not np.isfinite(cams).all():
        raise EvalError(f"{path}: cams contain NaN or inf; re-run infer.py for this id")
    return keys.astype(np.int64), cams


def cam_best(keys: np.ndarray, cams: np.ndarray, shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel: the highest CAM value and its label (keys[k] + 1; ties -> lowest k, as argmax).
    An image without keys gets score -inf (background at every threshold)."""
    if keys.size == 0:
        return np.full(shape, -np.inf, dtype=np.float32), np.zeros(shape, dtype=np.int64)
    # A running maximum over the few classes is ~3x faster than argmax over axis 0; the strict ">"
    # keeps the first class on ties, exactly like argmax.
    score = cams[0].copy()
    label = np.full(shape, keys[0] + 1, dtype=np.int64)
    for k in range(1, keys.size):
        better = cams[k] > score
        np.maximum(score, cams[k], out=score)
        np.putmask(label, better, keys[k] + 1)
    return score, label


def _sweep_chunk(chunk, num_classes: int, thresholds: Tuple[float, ...]):
    """Worker: summed (T, n, n + 1) confusions of a chunk of (gt_path, cam_path) pairs."""
    total = np.zeros((len(thresholds), num_classes, num_classes + 1), dtype=np.int64)
    for gt_path, cam_path in chunk:
        gt = read_label_png(gt_path)
        keys, cams = load_cam_file(cam_path, num_classes)
        check_size(gt, cams.shape[1:], gt_path, cam_path, "CAM")
        score, label = cam_best(keys, cams, gt.shape)
        total += sweep_confusion_matrices(gt, score, label, thresholds, num_classes)
    return total, len(chunk)


def evaluate_cams(ids: Sequence[str], gt_paths: Sequence, cam_paths: Sequence, num_classes: int,
                  thresholds: Sequence[float], workers: int = 0, *, skip_missing: bool = False,
                  progress: bool = True, min_per_worker: int = CAM_ITEMS_PER_WORKER) -> Dict:
    """Score the pseudo-masks of saved CAMs at every threshold (``workers`` processes at most,
    each with at least ``min_per_worker`` CAMs; eval/evaluator.py pool_size).

    Returns {"thresholds": sorted unique list, "scores": [compute_scores dict per threshold],
    "miou": float64 (T,), "best_index", "best_threshold", "confusions" (T, n, n + 1),
    "num_images", "missing"}. The best threshold is the one with the highest mIoU (the lowest
    such threshold on a tie)."""
    thr = tuple(sorted({float(t) for t in thresholds}))
    if not thr:
        raise ValueError("need at least one threshold")
    ids, gt_paths, cam_paths, missing = split_missing(ids, gt_paths, cam_paths, "CAM", skip_missing)
    if not ids:
        raise EvalError(f"no image left to evaluate: every id misses a file (first: "
                        f"{missing[0]['path']}); check the CAM and ground-truth folders and "
                        f"the id list")
    fn = functools.partial(_sweep_chunk, num_classes=int(num_classes), thresholds=thr)
    total = np.zeros((len(thr), num_classes, num_classes + 1), dtype=np.int64)
    pairs = [(str(g), str(c)) for g, c in zip(gt_paths, cam_paths)]
    for conf in run_chunked(fn, pairs, workers, desc="CAM sweep", progress=progress,
                            min_per_worker=min_per_worker):
        total += conf
    scores = [compute_scores(c) for c in total]
    miou = np.array([s["miou"] for s in scores])
    best = int(np.nanargmax(miou)) if np.isfinite(miou).any() else 0
    return {"thresholds": list(thr), "scores": scores, "miou": miou, "best_index": best,
            "best_threshold": thr[best], "confusions": total, "num_images": len(ids),
            "missing": missing}


def format_sweep(result: Dict) -> str:
    """The mIoU curve as a small text table, marking the best threshold."""
    lines = ["{:>8} {:>8} {:>8} {:>8} {:>8}".format("thr", "mIoU", "Prec", "Recall", "ACC")]
    for i, (t, s) in enumerate(zip(result["thresholds"], result["scores"])):
        mark = "  <- best" if i == result["best_index"] else ""
        lines.append("{:>8.3f} {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f}{}".format(
            t, s["miou"] * 100, s["mean_precision"] * 100, s["mean_recall"] * 100,
            s["pixel_accuracy"] * 100, mark))
    best = result["scores"][result["best_index"]]
    lines.append(f"best threshold {result['best_threshold']:.3f}: mIoU {best['miou'] * 100:.2f}")
    return "\n".join(lines) + "\n"
