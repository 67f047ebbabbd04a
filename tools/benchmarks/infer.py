"""Benchmark section "infer": seconds per image of the CAM computation (4 scales x flip) for
ResNet-38, the published one-view-at-a-time loop against infer.py's fast path.

    python tools/benchmark.py --only infer                  # CPU, VOC size (500x375), 1 image
    python tools/benchmark.py --only infer --quick          # 160x120 (smoke run, ~30 s on 2 cores)
    python tools/benchmark.py --only infer --device cuda    # CUDA rows only (--device all: both)

Rows: the reference loop (8 forward passes of batch 1, each view upsampled on its own), then the
fast path's pieces added one at a time (pair sum at feature resolution + present classes only,
channels_last, flip pair as one batch, on the CPU the frozen fused network of network/cpu/fuse.py and
then its Winograd graph (network/cpu/winograd.py), and on CUDA float16 autocast). ``default``
marks the path infer.py takes on that device with its default flags; on CUDA that path is also
timed on a COCO-size image (640x480) for the GPU check's projections. Each row reports the
largest CAM difference from the same device's reference row and how many pseudo-mask pixels
differ (thr 0.20).

Timing (tools/benchmarks/measure.py). CPU: every variant is warmed up on a quarter-size image
(oneDNN primitive creation and the fused network's one-off build, 1-2 s, off the clock), then
timed round-robin, rep by rep, so that load changes on a shared machine hit every variant alike
(a full-size round takes about 4 minutes on 2 cores: 1 rep, 2 with --quick); wall and CPU
seconds (the trustworthy one on a shared machine) with their speed-ups over the reference.
CUDA: one variant at a time with infer.py's numerics (TF32 and cudnn.benchmark off), 2 full-size
warm-up calls, then >= 5 calls each between two torch.cuda.synchronize calls; median and min.
Peak memory of a row: CUDA max_memory_allocated / max_memory_reserved above what was held
before the timed calls (the weights are already resident), on the CPU the peak resident-set
growth during a call (largest over the reps).
The network has fixed-seed random weights: the timings do not depend on the values, and fc8 is
scaled so that the CAMs have structure and the mask comparison means something.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

import infer
from data.transforms import INFER_SCALES, multiscale_arrays
from network import build_network
from network.inference import SpeedOptions, prepare_for_inference
from tools.benchmarks.measure import (CUDA_REPS, CUDA_WARMUP, PeakMemory, Timing, bench_devices,
                                      free_cuda, time_calls)
from network import cam as camlib

NETWORK = "resnet38_eps"
NUM_CLASSES = 20
LABEL_CLASSES = (6, 14)          # car, person: two present classes, as in a typical VOC image
LABEL = torch.zeros(NUM_CLASSES)
LABEL[list(LABEL_CLASSES)] = 1


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image (upsampled noise): realistic enough for timing, identical every run."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def make_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_network(NETWORK, NUM_CLASSES).eval()
    with torch.inference_mode():
        raw = model.forward_cam(torch.randn(1, 3, 64, 64))
    with torch.no_grad():  # logits with a std of about 2: softmax maps that are not flat
        model.fc8.weight.mul_(2.0 / float(raw.std()))
    return model.to(device)


def make_runner(model, images, label, size, device, *, fast: bool, channels_last: bool = False,
                batch_views: bool = False, amp: bool = False, fuse: bool = False,
                winograd: bool = False, warm_small: bool = True):
    """A closure computing one image's CAMs with one variant; with ``warm_small`` it is warmed
    up once on a quarter-size image (oneDNN primitive creation and the fused network's one-off
    build, about 1-2 s of CPU, off the clock)."""
    m = prepare_for_inference(model, device, SpeedOptions(
        fast=fast, fuse=fuse, winograd=winograd, channels_last=channels_last,
        batch_views=batch_views, amp=amp))

    def once(imgs, sz):
        with torch.inference_mode():
            return (infer.cams_fast if fast else infer.cams_reference)(m, imgs, label, sz)

    if warm_small:
        small = [torch.nn.functional.interpolate(i[None], scale_factor=0.25)[0] for i in images]
        once(small, tuple(s // 4 for s in size))
    return lambda: once(images, size)


def image_inputs(width: int, height: int):
    """The 4 scales of a synthetic image as infer.py's dataset gives them, and its (H, W)."""
    pil = synthetic_image(width, height)
    return [torch.from_numpy(a) for a in multiscale_arrays(pil, INFER_SCALES)], (height, width)


def variants_for(device: torch.device) -> List[Tuple[str, str, dict]]:
    """(id, description, SpeedOptions keywords); the id "default" is infer.py's default path."""
    cpu = device.type == "cpu"
    out = [("reference", "reference: 8 views, batch 1 (published loop, --no-fast)", dict(fast=False)),
           ("fast_nchw", "fast: pair sum at feature res., present classes only, NCHW",
            dict(fast=True, channels_last=False, batch_views=False)),
           ("fast_cl", "fast + channels_last" + (" (--no-fuse)" if cpu else ""),
            dict(fast=True, channels_last=True, batch_views=False)),
           ("default" if not cpu else "fast_cl_batch",
            "fast + channels_last + flip pair as one batch" + ("" if cpu else " (CUDA default)"),
            dict(fast=True, channels_last=True, batch_views=True))]
    if cpu:
        out.append(("fused", "fast + fused network: conv-BN folded, frozen TorchScript, "
                    "pre-packed oneDNN (--no-winograd)",
                    dict(fast=True, channels_last=False, batch_views=False, fuse=True)))
        out.append(("default", "fast + fused network: conv-BN folded, Winograd F(2x2,3x3) for "
                    ">= 256 channels, other convs pre-packed (CPU default)",
                    dict(fast=True, channels_last=False, batch_views=False, fuse=True,
                         winograd=True)))
    else:
        out.append(("amp_fp16", "fast + channels_last + batch + AMP fp16 (--amp)",
                    dict(fast=True, channels_last=True, batch_views=True, amp=True)))
    return out


def _row(device, image, vid, name, timing: Timing, peak_mb, ref, *, reserved_mb=None):
    keys, cams, _ = timing.result
    ref_timing, ref_mask, ref_cams = ref
    mask = camlib.pseudo_mask(keys, cams, thr=camlib.DEFAULT_THR).cpu()
    row = {"device": device.type, "network": NETWORK, "image": image, "variant": vid,
           "path": name, "default": "yes" if vid == "default" else "",
           "s/image": timing.median, "min s": timing.min, "reps": timing.reps,
           # against the reference at the same image size only (not for the COCO-size row)
           "speed-up (wall)": ref_timing.median / timing.median if ref_mask is not None else None}
    if device.type == "cpu":
        row.update({"CPU s/image": timing.cpu_median,
                    "speed-up (CPU)": ref_timing.cpu_median / timing.cpu_median})
    row["peak MB"] = peak_mb
    if device.type == "cuda":
        row["peak reserved MB"] = reserved_mb
    if ref_mask is not None and mask.shape == ref_mask.shape:
        row["max |dCAM|"] = float((cams.float().cpu() - ref_cams.float().cpu()).abs().max())
        row["mask px differing"] = int((mask != ref_mask).sum())
    return row


def _reference(timing: Timing):
    keys, cams, _ = timing.result
    return timing, camlib.pseudo_mask(keys, cams, thr=camlib.DEFAULT_THR).cpu(), cams


def _cpu_rows(device, width, height, reps):
    images, size = image_inputs(width, height)
    model = make_model(device)
    variants = variants_for(device)
    layouts = {False: model, True: copy.deepcopy(model)}
    runners = [make_runner(layouts[kw.get("channels_last", False)], images, LABEL, size, device,
                           **kw) for _, _, kw in variants]
    timings = [Timing() for _ in variants]
    peaks = [None] * len(variants)
    for _ in range(reps):
        for i, fn in enumerate(runners):
            with PeakMemory(device) as peak:
                timings[i].add(fn, device)
            if peak.alloc_mb is not None:
                peaks[i] = max(peaks[i] or 0.0, peak.alloc_mb)
    ref = _reference(timings[0])
    return [_row(device, f"{width}x{height}", vid, name, t, p, ref)
            for (vid, name, _), t, p in zip(variants, timings, peaks)]


def _cuda_rows(device, width, height, reps, coco: bool):
    from utils.device import configure_numerics

    configure_numerics(device)  # infer.py's numerics: TF32 and cudnn.benchmark off
    images, size = image_inputs(width, height)
    base = make_model(torch.device("cpu"))
    rows, ref = [], (None, None, None)
    jobs = [(vid, name, kw, images, size, f"{width}x{height}") for vid, name, kw in variants_for(device)]
    if coco:  # COCO's typical image, for the GPU check's projection of the COCO pseudo-masks
        coco_images, coco_size = image_inputs(640, 480)
        vid, name, kw = [v for v in variants_for(device) if v[0] == "default"][0]
        jobs.append((vid, name + ", COCO size", kw, coco_images, coco_size, "640x480"))
    for vid, name, kw, imgs, sz, image in jobs:
        free_cuda(device)
        model = copy.deepcopy(base).to(device)
        fn = make_runner(model, imgs, LABEL, sz, device, warm_small=False, **kw)
        timing, peak = time_calls(fn, device, CUDA_WARMUP, reps)
        if vid == "reference":
            ref = _reference(timing)
        rows.append(_row(device, image, vid, name, timing, peak.alloc_mb,
                         ref if image == f"{width}x{height}" else (ref[0], None, None),
                         reserved_mb=peak.reserved_mb))
        del model, fn
    free_cuda(device)
    return rows


def run(args) -> Tuple[str, List[Dict]]:
    width, height = (160, 120) if args.quick else (500, 375)
    rows = []
    for device in bench_devices(args.device):
        if device.type == "cpu":
            rows += _cpu_rows(device, width, height, reps=2 if args.quick else 1)
        else:
            rows += _cuda_rows(device, width, height, CUDA_REPS if args.quick else 2 * CUDA_REPS,
                               coco=not args.quick)
    return (f"infer: CAMs of one image, {NETWORK}, scales {list(INFER_SCALES)} x flip", rows)
