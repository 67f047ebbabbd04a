"""Benchmark section "seg": DeepLab-v2 inference seconds per image at VOC size (500x375).

What infer_seg.py does per image: the MSC network (scales 1, 0.75, 0.5, pixel-wise max), bilinear
upsampling to the image and softmax, then optionally the dense CRF (DeepLab parameters, 21 labels,
10 iterations). Weights are random (timing does not depend on them). The full run measures the
published ResNet-101 in NCHW and channels_last; --quick uses a quarter-size image and one
repetition (a smoke run, not a measurement). VOC val (1,449 images) takes about
1,449 x (network + CRF) seconds per process.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from infer_seg import crf_labels, predict_probs
from network.deeplab import build_deeplab

FULL = (375, 500)   # a typical VOC image (H, W)
QUICK = (94, 125)
N_CLASSES = 21


def _devices(args):
    want = getattr(args, "device", "cpu")
    devs = ["cpu"] if want in ("cpu", "all") else []
    if want in ("cuda", "all") and torch.cuda.is_available():
        devs.append("cuda")
    return devs


def _time_net(model, x, reps: int, device: str) -> float:
    predict_probs(model, x)  # warm-up (allocations, cudnn autotune)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        predict_probs(model, x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def run(args):
    quick = getattr(args, "quick", False)
    h, w = QUICK if quick else FULL
    reps = 1 if quick else 3
    rows = []
    torch.manual_seed(0)
    for device in _devices(args):
        if device == "cuda":
            torch.backends.cudnn.benchmark = True  # as published
        model = build_deeplab("deeplabv2_resnet101", N_CLASSES).eval().to(device)
        x = torch.randn(1, 3, h, w, device=device) * 50
        formats = ["nchw", "channels_last"] if not quick else ["nchw"]
        for fmt in formats:
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            model.to(memory_format=mf)
            sec = _time_net(model, x.contiguous(memory_format=mf), reps, device)
            rows.append({"stage": "DeepLab-v2 R101 MSC (3 scales)", "input HxW": f"{h}x{w}",
                         "device": device, "format": fmt, "threads": torch.get_num_threads(),
                         "sec/image": round(sec, 3),
                         "VOC val (1449) min": round(1449 * sec / 60, 1)})
        del model
    # CRF runs on the CPU whatever the network device is.
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(N_CLASSES), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        crf_labels(rgb, probs, "rgb")
        t = time.perf_counter()
        for _ in range(reps):
            crf_labels(rgb, probs, "rgb")
        sec = (time.perf_counter() - t) / reps
        rows.append({"stage": "dense CRF (DeepLab params, 10 it)", "input HxW": f"{h}x{w}",
                     "device": "cpu", "format": "-", "threads": 1, "sec/image": round(sec, 3),
                     "VOC val (1449) min": round(1449 * sec / 60, 1)})
    except ImportError as e:
        rows.append({"stage": f"dense CRF skipped ({e})", "input HxW": f"{h}x{w}"})
    return "Segmentation inference (DeepLab-v2, seconds per image)", rows
