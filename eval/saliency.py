"""How good is a saliency map for EPS? Salient-object metrics against the ground truth's foreground,
in pure numpy (tools/eval_saliency.py reads the files; docs/custom-data.md explains the report).

Conventions:

* A map is 8-bit (0..255) as EPS reads it; the ground truth's foreground is every pixel that is
  neither background (0) nor ignore (255). Ignore pixels count nowhere, MAE included (salient-
  object benchmarks have no ignore label; VOC's boundary band would otherwise count as wrong).
* Thresholds are the standard 256 of the SOD benchmarks: ``map >= t`` for t = 0..255.
  Precision with no predicted pixel is 0; recall of an image without foreground is undefined,
  so such images are left out of the F-measures (and counted).
* F-beta with beta^2 = 0.3 (Achanta et al. 2009, used by every SOD benchmark), per image from its
  precision and recall at each threshold. "max F" is the maximum over thresholds of the mean
  per-image F curve (the sample-based max F of the SOD toolboxes, e.g. PySODMetrics), per image
  the maximum of its own curve. Unlike those toolboxes, maps are NOT stretched to their own
  min..max first: EPS reads the raw values.
* EPS's own threshold: the EPS loss rounds the map ``v / 255`` (network/losses.py eps_loss,
  ``torch.round``, half to even), so a pixel is salient for EPS iff ``v >= 128`` (127.5 / 255 is
  never hit by an 8-bit value). "F at EPS's threshold" is the per-image F there, averaged.
* Coverage of a class: the share of its ground-truth pixels that are salient for EPS. EPS keeps a
  present class in the foreground only when its CAM overlaps the salient region by more than tau
  (0.4 in the published scripts): a class whose objects the saliency does not cover is pushed
  into the background and cannot be learned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

IGNORE_LABEL = 255
BETA2 = 0.3
NUM_THRESHOLDS = 256
EPS_SALIENT_MIN = 128  # round(v / 255) == 1  <=>  v >= 128 (8-bit v)
# An object of which less than this share is salient is reported as (partly) missed. On the demo
# dataset every deliberately damaged object lies below 0.69 and every intact one above 0.95.
MISS_BELOW = 0.8
# A class whose pixels are salient less often than this cannot be learned (its CAM fails tau).
DEFAULT_TAU = 0.4


def f_beta(precision, recall, beta2: float = BETA2):
    """``(1 + b2) P R / (b2 P + R)``, 0 where P and R are both 0 (elementwise)."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    den = beta2 * p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (1 + beta2) * p * r / np.where(den > 0, den, 1), 0.0)


def masks(gt: np.ndarray, ignore_label: int = IGNORE_LABEL) -> Tuple[np.ndarray, np.ndarray]:
    """(valid, foreground) boolean masks of a label map: valid = not ignore, foreground = valid
    and not background."""
    gt = np.asarray(gt)
    valid = gt != ignore_label
    return valid, valid & (gt != 0)


def pr_curves(sal: np.ndarray, fg: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Precision and recall (each (256,)) of ``sal >= t`` for t = 0..255 over the valid pixels.
    Recall is NaN when the image has no foreground; precision is 0 with no predicted pixel."""
    sal = np.asarray(sal)
    if sal.dtype != np.uint8:
        raise ValueError(f"saliency maps are 8-bit, got {sal.dtype}")
    hist_fg = np.bincount(sal[fg], minlength=NUM_THRESHOLDS)
    hist_bg = np.bincount(sal[valid & ~fg], minlength=NUM_THRESHOLDS)
    tp = np.cumsum(hist_fg[::-1])[::-1].astype(np.float64)  # pixels >= t
    fp = np.cumsum(hist_bg[::-1])[::-1].astype(np.float64)
    pos = tp + fp
    precision = np.where(pos > 0, tp / np.where(pos > 0, pos, 1), 0.0)
    n_fg = float(hist_fg.sum())
    recall = tp / n_fg if n_fg > 0 else np.full(NUM_THRESHOLDS, np.nan)
    return precision, recall


def spurious_regions(salient: np.ndarray, objects: np.ndarray, valid: np.ndarray) -> Tuple[int, int]:
    """(number, valid pixels) of 8-connected salient regions that touch no object: salient blobs
    where the ground truth has nothing (a false detection, or stuff the model calls salient).
    ``objects`` is every non-background pixel, ignore included: VOC's ignore band runs along the
    object edges and would otherwise cut an object's salient halo off from the object."""
    import cv2
    region = salient.astype(np.uint8)
    n, labels = cv2.connectedComponents(region, connectivity=8)
    if n <= 1:
        return 0, 0
    hit = np.zeros(n, bool)
    hit[np.unique(labels[objects & salient])] = True
    sizes = np.bincount(labels[valid], minlength=n)
    spurious = [k for k in range(1, n) if not hit[k]]
    return len(spurious), int(sizes[spurious].sum())


@dataclass
class ImageScores:
    """The scores of one map. ``f_curve`` (256,) is kept for the dataset's max F; ``classes``
    maps a class value (1..C, as in the ground truth) to (its pixels, those salient for EPS)."""
    id: str
    mae: float
    max_f: float            # NaN without foreground
    f_eps: float            # NaN without foreground
    precision_eps: float
    recall_eps: float       # NaN without foreground
    fg_pixels: int
    salient_pixels: int
    spurious: int
    spurious_pixels: int
    f_curve: np.ndarray = field(repr=False)
    classes: Dict[int, Tuple[int, int]] = field(default_factory=dict)

    def coverage(self, value: int) -> float:
        pixels, salient = self.classes[value]
        return salient / pixels if pixels else float("nan")


def image_scores(img_id: str, sal: np.ndarray, gt: np.ndarray,
                 ignore_label: int = IGNORE_LABEL) -> ImageScores:
    """Every per-image figure of one (8-bit map, label map) pair of the same shape."""
    sal, gt = np.asarray(sal), np.asarray(gt)
    if sal.shape != gt.shape:
        raise ValueError(f"{img_id}: saliency map {sal.shape} and ground truth {gt.shape} differ")
    valid, fg = masks(gt, ignore_label)
    n_valid = int(valid.sum())
    mae = float(np.abs(sal[valid].astype(np.float64) / 255.0 - fg[valid]).mean()) if n_valid else float("nan")
    precision, recall = pr_curves(sal, fg, valid)
    curve = f_beta(precision, recall) if fg.any() else np.full(NUM_THRESHOLDS, np.nan)
    salient = sal >= EPS_SALIENT_MIN
    values, counts = np.unique(gt[fg], return_counts=True)
    classes = {int(v): (int(c), int((salient & (gt == v)).sum())) for v, c in zip(values, counts)}
    n_spur, spur_px = spurious_regions(salient, gt != 0, valid)
    return ImageScores(
        id=img_id, mae=mae, max_f=float(np.nanmax(curve)) if fg.any() else float("nan"),
        f_eps=float(curve[EPS_SALIENT_MIN]), precision_eps=float(precision[EPS_SALIENT_MIN]),
        recall_eps=float(recall[EPS_SALIENT_MIN]), fg_pixels=int(fg.sum()),
        salient_pixels=int((salient & valid).sum()), spurious=n_spur, spurious_pixels=spur_px,
        f_curve=curve, classes=classes)


@dataclass
class ClassCoverage:
    name: str
    images: int          # images in which the class has ground-truth pixels
    pixels: int
    salient: int
    missed: int          # objects (image, class) with coverage < miss_below
    below_tau: int       # objects with coverage < tau: EPS sends the class to the background there

    @property
    def coverage(self) -> float:
        return self.salient / self.pixels if self.pixels else float("nan")


@dataclass
class SaliencySummary:
    """The dataset's figures (see the module docstring for the conventions)."""
    num_images: int
    num_scored: int       # images with foreground (in the F-measures)
    mae: float
    max_f: float
    max_f_threshold: int
    f_eps: float
    precision_eps: float
    recall_eps: float
    classes: List[ClassCoverage]
    missed: List[Tuple[str, str, float]]          # (id, class name, coverage), worst first
    spurious_images: List[Tuple[str, int, float]]  # (id, regions, share of the image's salient px)
    miss_below: float
    tau: float

    def uncovered_classes(self) -> List[ClassCoverage]:
        """Classes the saliency covers less than tau overall: EPS cannot learn them."""
        return [c for c in self.classes if c.pixels and c.coverage < self.tau]


def summarize(scores: Sequence[ImageScores], class_names: Sequence[str],
              miss_below: float = MISS_BELOW, tau: float = DEFAULT_TAU) -> SaliencySummary:
    """Dataset figures from per-image scores; ``class_names[c]`` names ground-truth value c + 1."""
    scored = [s for s in scores if s.fg_pixels > 0]
    curves = np.stack([s.f_curve for s in scored]) if scored else np.zeros((0, NUM_THRESHOLDS))
    mean_curve = curves.mean(axis=0) if scored else np.full(NUM_THRESHOLDS, np.nan)
    best = int(np.nanargmax(mean_curve)) if scored else EPS_SALIENT_MIN

    def mean(values):
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    per_class = []
    missed: List[Tuple[str, str, float]] = []
    for c, name in enumerate(class_names, start=1):
        objs = [(s.id, s.coverage(c)) for s in scores if c in s.classes]
        low = [(i, name, cov) for i, cov in objs if cov < miss_below]
        missed += low
        per_class.append(ClassCoverage(
            name=name, images=len(objs), pixels=sum(s.classes[c][0] for s in scores if c in s.classes),
            salient=sum(s.classes[c][1] for s in scores if c in s.classes), missed=len(low),
            below_tau=sum(1 for _, cov in objs if cov < tau)))
    missed.sort(key=lambda x: (x[2], x[0]))
    spurious = sorted(((s.id, s.spurious, s.spurious_pixels / max(s.salient_pixels, 1))
                       for s in scores if s.spurious), key=lambda x: (-x[2], x[0]))
    return SaliencySummary(
        num_images=len(scores), num_scored=len(scored), mae=mean([s.mae for s in scores]),
        max_f=float(mean_curve[best]) if scored else float("nan"), max_f_threshold=best,
        f_eps=mean([s.f_eps for s in scored]), precision_eps=mean([s.precision_eps for s in scored]),
        recall_eps=mean([s.recall_eps for s in scored]), classes=per_class, missed=missed,
        spurious_images=spurious, miss_below=miss_below, tau=tau)
