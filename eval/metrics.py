"""Confusion-matrix segmentation metrics in pure numpy (no I/O).

Conventions (those of the published ``evaluate_png.py`` ``IOUMetric``; docs/evaluation.md):

* rows are ground truth, columns are predictions, classes ``0..n-1`` with 0 = background;
* a ground-truth value outside ``0..n-1`` (the VOC boundary value 255) is ignored;
* IoU_c = TP / (TP + FP + FN), precision_c = TP / (TP + FP), recall_c = TP / (TP + FN);
* mIoU, mean precision and mean recall are ``nanmean`` over all n classes: a class absent from
  both GT and prediction is 0/0 = NaN and skipped, a class in only one of them counts as 0.

One deliberate extension: the matrix has an extra last column, ``n``, that counts predictions
outside ``0..n-1`` (e.g. 255 written by a buggy pipeline). The published script drops those
pixels, so a prediction of 255 is never penalised; we count them as wrong (they add to the GT
class's false negatives). ``compute_scores(..., ignore_invalid=True)`` drops the column again and
reproduces the published numbers exactly. On valid predictions the column is zero and both agree.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

IGNORE_LABEL = 255  # VOC boundary / "don't care" value in ground-truth masks


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion counts of one image as an int64 array of shape (n, n + 1).

    ``conf[g, p]`` = number of pixels with GT g and prediction p; ``conf[g, n]`` = pixels with GT g
    whose prediction is outside ``0..n-1``. GT pixels outside ``0..n-1`` are ignored. One
    ``np.bincount`` per image (over ``g * 256 + p`` for 8-bit inputs, else ``g * (n + 1) + p``)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    n = int(num_classes)
    if gt.dtype == np.uint8 and pred.dtype == np.uint8 and n <= 256:
        # Fast path for 8-bit PNGs: count all 256x256 (gt, pred) pairs without masks or int64
        # temporaries (5-10x faster under memory pressure), then fold the out-of-range
        # predictions into column n and drop the out-of-range GT rows.
        code = (gt.astype(np.uint16) << 8) | pred
        pairs = np.bincount(code.ravel(), minlength=65536).reshape(256, 256)
        out = np.zeros((n, n + 1), dtype=np.int64)
        out[:, :n] = pairs[:n, :n]
        out[:, n] = pairs[:n, n:].sum(axis=1)
        return out
    g = gt.ravel().astype(np.intp, copy=False)
    p = pred.ravel().astype(np.intp, copy=False)
    valid = (g >= 0) & (g < n)
    # Every out-of-range prediction goes to the extra column n.
    p = np.where((p >= 0) & (p < n), p, n)
    idx = g[valid] * (n + 1) + p[valid]
    return np.bincount(idx, minlength=n * (n + 1)).reshape(n, n + 1).astype(np.int64, copy=False)


def sweep_confusion_matrices(gt: np.ndarray, fg_score: np.ndarray, fg_label: np.ndarray,
                             thresholds: Sequence[float], num_classes: int) -> np.ndarray:
    """Confusion matrices (T, n, n + 1) of ``pred_t = fg_label if fg_score > t else 0`` for every
    threshold t, from ONE bincount (instead of T masks and T bincounts).

    This is the CAM pseudo-mask rule: argmax over ``[t, cam_1, ..., cam_K]`` with ties going to
    the background (index 0), i.e. a pixel is foreground only when its best CAM is strictly above
    t. ``fg_label`` holds the class (1..n-1) of the best CAM per pixel.

    Why it works: with thresholds sorted, ``k = #{t_j < score}`` says that the pixel is foreground
    for the first k thresholds and background for the rest. Counting pixels by (k, gt, label) and
    taking suffix / prefix sums over k gives every threshold's matrix."""
    gt = np.asarray(gt)
    fg_score = np.asarray(fg_score)
    fg_label = np.asarray(fg_label)
    if not (gt.shape == fg_score.shape == fg_label.shape):
        raise ValueError(f"shapes differ: gt {gt.shape}, score {fg_score.shape}, label {fg_label.shape}")
    # Compare in the CAM's precision: the published pseudo-mask puts t in a float32 tensor beside
    # float32 CAMs, so a CAM value equal to float32(t) is a tie (background), not foreground.
    cmp_dtype = np.float64 if fg_score.dtype == np.float64 else np.float32
    thr = np.asarray(thresholds, dtype=np.float64).ravel().astype(cmp_dtype).astype(np.float64)
    if thr.size == 0:
        raise ValueError("need at least one threshold")
    n = int(num_classes)
    m = n + 1
    t = thr.size
    order = np.argsort(thr, kind="stable")
    g = gt.ravel().astype(np.intp, copy=False)
    valid = (g >= 0) & (g < n)
    g = g[valid]
    s = fg_score.ravel()[valid].astype(np.float64, copy=False)
    f = fg_label.ravel()[valid].astype(np.intp, copy=False)
    f = np.where((f >= 0) & (f < n), f, n)
    k = np.searchsorted(thr[order], s, side="left")  # number of thresholds strictly below s
    counts = np.bincount((k * n + g) * m + f, minlength=(t + 1) * n * m).reshape(t + 1, n, m)
    # Foreground part for sorted threshold j: pixels with k > j (suffix sum over k).
    suffix = np.cumsum(counts[::-1], axis=0)[::-1]
    conf = suffix[1:].copy()
    # Background part: pixels with k <= j predict class 0 whatever their label (prefix sum).
    conf[:, :, 0] += np.cumsum(counts.sum(axis=2), axis=0)[:t]
    out = np.empty_like(conf)
    out[order] = conf
    return out.astype(np.int64, copy=False)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def compute_scores(conf: np.ndarray, ignore_invalid: bool = False) -> Dict:
    """Scores of an accumulated confusion matrix of shape (n, n) or (n, n + 1).

    ``ignore_invalid=True`` drops the invalid-prediction column (the published behaviour). Returns
    a dict of python floats and float64 arrays (per class, NaN where undefined):
    ``iou precision recall`` (n,), ``miou mean_precision mean_recall pixel_accuracy mean_accuracy
    fwiou miou_gt_classes``, and counts ``gt_pixels pred_pixels tp num_pixels invalid_pixels``.

    ``mean_accuracy`` = nanmean of per-class recall (deeplab-pytorch "Mean Accuracy");
    ``fwiou`` = sum over GT-present classes of (GT frequency x IoU); ``miou_gt_classes`` = mean IoU
    over classes present in the GT only (deeplab-pytorch libs/utils/metric.py), for comparison.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (n, n) or (n, n + 1), got {conf.shape}")
    n = conf.shape[0]
    invalid = conf[:, n] if conf.shape[1] == n + 1 else np.zeros(n)
    square = conf[:, :n]
    tp = np.diag(square)
    pred_pixels = square.sum(axis=0)
    gt_pixels = square.sum(axis=1) if ignore_invalid else square.sum(axis=1) + invalid
    total = gt_pixels.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt_pixels + pred_pixels - tp)
        precision = tp / pred_pixels
        recall = tp / gt_pixels
        pixel_accuracy = float(tp.sum() / total) if total > 0 else float("nan")
        freq = gt_pixels / total if total > 0 else np.zeros(n)
    present = gt_pixels > 0
    return {
        "num_classes": n,
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "miou": _nanmean(iou),
        "mean_precision": _nanmean(precision),
        "mean_recall": _nanmean(recall),
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": _nanmean(recall),
        "fwiou": float((freq[present] * iou[present]).sum()) if present.any() else float("nan"),
        "miou_gt_classes": _nanmean(iou[present]) if present.any() else float("nan"),
        "tp": tp,
        "gt_pixels": gt_pixels,
        "pred_pixels": pred_pixels,
        "num_pixels": float(total),
        "invalid_pixels": float(invalid.sum()),
        "ignore_invalid": bool(ignore_invalid),
    }


def _json_float(x) -> Optional[float]:
    # JSON has no NaN: undefined scores are written as null.
    x = float(x)
    return None if not np.isfinite(x) else x


def scores_to_json(scores: Dict, label_names: Sequence[str]) -> Dict:
    """A JSON-ready dict: summary metrics plus per-class values keyed by class name."""
    n = scores["num_classes"]
    if len(label_names) != n:
        raise ValueError(f"{len(label_names)} class names for {n} classes")
    if len(set(label_names)) != n:
        raise ValueError(f"class names must be unique (they key the per-class results): {list(label_names)}")
    per_class = {}
    for i, name in enumerate(label_names):
        per_class[name] = {
            "index": i,
            "iou": _json_float(scores["iou"][i]),
            "precision": _json_float(scores["precision"][i]),
            "recall": _json_float(scores["recall"][i]),
            "gt_pixels": int(scores["gt_pixels"][i]),
            "pred_pixels": int(scores["pred_pixels"][i]),
        }
    out = {k: _json_float(scores[k]) for k in
           ("miou", "mean_precision", "mean_recall", "pixel_accuracy", "mean_accuracy", "fwiou",
            "miou_gt_classes")}
    out.update(num_pixels=int(scores["num_pixels"]), invalid_pixels=int(scores["invalid_pixels"]),
               ignore_invalid=scores["ignore_invalid"], per_class=per_class)
    return out


def format_table(scores: Dict, label_names: Sequence[str],
                 label_numbers: Optional[Sequence[str]] = None) -> str:
    """The published ``evaluate_png.py`` text file: header, a "mean" row, one row per class
    (values x100 with 2 decimals, names cut to 10 characters as published)."""
    numbers: List[str] = [str(i) for i in range(len(label_names))] if label_numbers is None \
        else [str(x) for x in label_numbers]
    row = "{:>5} {:>20} {:>10.2f} {:>10.2f} {:>10.2f}\n"
    text = "{:>5} {:>20} {:>10} {:>10} {:>10}\n".format("IDX", "Name", "IoU", "Prec", "Recall")
    text += row.format("-", "mean", scores["miou"] * 100, scores["mean_precision"] * 100,
                       scores["mean_recall"] * 100)
    for i, name in enumerate(label_names):
        text += row.format(numbers[i], name[:10], scores["iou"][i] * 100,
                           scores["precision"][i] * 100, scores["recall"][i] * 100)
    return text


def format_summary(scores: Dict) -> str:
    """The published two-line stdout summary (IDX IoU Prec Recall ACC)."""
    return ("{:>8} {:>8} {:>8} {:>8} {:>8}\n".format("IDX", "IoU", "Prec", "Recall", "ACC")
            + "{:>8} {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f}\n".format(
                "mean", scores["miou"] * 100, scores["mean_precision"] * 100,
                scores["mean_recall"] * 100, scores["pixel_accuracy"] * 100))
