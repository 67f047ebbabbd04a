"""Benchmark section "eval": evaluator throughput (images/s) on generated VOC-size label PNGs.

200 pairs of 500x375 palette PNGs (GT with object blobs and 255 boundary bands, predictions that
disagree near the borders) are written to a temporary folder, then ``evaluate_folders`` runs in
this process and with a pool of 2 worker processes (forced: evaluate.py would run 200 pairs in
its own process, eval/evaluator.py pool_size). This process has imported torch, so its workers
are spawned; evaluate.py, which never imports torch, forks them (milliseconds instead of ~0.25 s
each): the "published" section times evaluate.py itself, whole process. The CAM sweep
(19 thresholds) runs on 2-class CAM .npz files. The files were just written, so they are read
from the page cache: on a cold disk expect lower numbers. Target: VOC train (1,464 images) well
under a minute on 2 cores.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from eval.cam_sweep import evaluate_cams, thresholds_from_range
from eval.evaluator import evaluate_folders
from utils.io import save_label_png, save_npz

H, W = 375, 500  # a typical VOC image
NUM_CLASSES = 21
VOC_TRAIN = 1464


def _blobs(rng, n_objects: int):
    """A label map with n_objects elliptic objects of random classes and a 5-px 255 boundary."""
    yy, xx = np.mgrid[:H, :W]
    gt = np.zeros((H, W), np.uint8)
    boundary = np.zeros((H, W), bool)
    classes = rng.integers(1, NUM_CLASSES, size=n_objects)
    for c in classes:
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(30, 150), rng.uniform(30, 200)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        gt[d < 1] = c
        boundary |= np.abs(np.sqrt(d) - 1) * min(ry, rx) < 2.5
    return gt, boundary, classes


def make_pairs(root: Path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"img{i:05d}" for i in range(n)]
    for i in ids:
        gt, boundary, _ = _blobs(rng, int(rng.integers(1, 4)))
        pred = np.roll(gt, int(rng.integers(-8, 9)), axis=1)  # a shifted, imperfect prediction
        save_label_png(root / "pred" / f"{i}.png", pred)
        gt[boundary] = 255
        save_label_png(root / "gt" / f"{i}.png", gt)
    return ids


def make_cams(root: Path, ids, seed: int = 1):
    """Smooth 2-class CAMs (compress like real ones) matching the GT size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    for i in ids:
        cams = []
        for _ in range(2):
            cy, cx, s = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(40, 150)
            cams.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
        save_npz(root / "cam" / f"{i}.npz", keys=np.sort(rng.choice(20, 2, replace=False)),
                 cams=np.stack(cams).astype(np.float32))


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(args):
    if getattr(args, "device", "cpu") == "cuda":  # the evaluator has no CUDA rows
        return "Evaluator", [{"task": "skipped: evaluate.py runs on the CPU (--device cpu or all)"}]
    n = 40 if getattr(args, "quick", False) else 200
    n_cam = 20 if getattr(args, "quick", False) else 100
    rows = []
    with tempfile.TemporaryDirectory(prefix="eps_bench_eval_") as tmp:
        root = Path(tmp)
        ids = make_pairs(root, n)
        gts = [root / "gt" / f"{i}.png" for i in ids]
        preds = [root / "pred" / f"{i}.png" for i in ids]
        make_cams(root, ids[:n_cam])
        cams = [root / "cam" / f"{i}.npz" for i in ids[:n_cam]]
        thr = thresholds_from_range(0.05, 0.95, 0.05)
        for workers in (1, 2):
            secs = _timed(lambda: evaluate_folders(ids, gts, preds, NUM_CLASSES, workers,
                                                   progress=False, min_per_worker=1))
            rows.append({"task": f"PNG pairs {W}x{H}", "workers": workers, "images": n,
                         "seconds": secs, "images/s": n / secs,
                         "VOC train 1,464 (s)": VOC_TRAIN * secs / n})
        for workers in (1, 2):
            secs = _timed(lambda: evaluate_cams(ids[:n_cam], gts[:n_cam], cams, NUM_CLASSES, thr,
                                                workers, progress=False, min_per_worker=1))
            rows.append({"task": f"CAM sweep, {len(thr)} thresholds", "workers": workers,
                         "images": n_cam, "seconds": secs, "images/s": n_cam / secs,
                         "VOC train 1,464 (s)": VOC_TRAIN * secs / n_cam})
    return "Evaluator", rows
