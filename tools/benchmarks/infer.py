"""Benchmark section "infer": seconds per image of the CAM computation (4 scales x flip) for
ResNet-38, the published one-view-at-a-time loop against infer.py's fast path.

    python tools/benchmark.py --only infer            # VOC size (500x375), 1 image
    python tools/benchmark.py --only infer --quick    # 160x120 (smoke run, ~30 s on 2 cores)
    python tools/benchmark.py --only infer --device all   # adds CUDA rows when a GPU is present

Rows: the reference loop (8 forward passes of batch 1, each view upsampled on its own), then the
fast path's pieces added one at a time (pair sum at feature resolution + present classes only,
channels_last, flip pair as one batch, on the CPU the frozen fused network of network/cpu/fuse.py and
then its Winograd graph (network/cpu/winograd.py), and on CUDA float16 autocast). Each row reports wall and
CPU seconds with the speed-up over the reference for each (on a shared machine the CPU time is
the trustworthy one: wall time moves with the other jobs' load), the largest CAM difference and
how many pseudo-mask pixels differ (thr 0.20).
The network has fixed-seed random weights: the timings do not depend on the values, and fc8 is
scaled so that the CAMs have structure and the mask comparison means something.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

import infer
from data.transforms import INFER_SCALES, multiscale_arrays
from network import build_network
from network.inference import SpeedOptions, prepare_for_inference
from utils import cam as camlib

NETWORK = "resnet38_eps"
NUM_CLASSES = 20
LABEL_CLASSES = (6, 14)          # car, person: two present classes, as in a typical VOC image


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(model, images, label, size, device, *, fast: bool, channels_last: bool = False,
                batch_views: bool = False, amp: bool = False, fuse: bool = False,
                winograd: bool = False):
    """A closure computing one image's CAMs with one variant, warmed up on a small image
    (oneDNN primitive creation / CUDA context off the clock; the fused network's one-off build,
    about 1-2 s of CPU per run, is off the clock too)."""
    m = prepare_for_inference(model, device, SpeedOptions(
        fast=fast, fuse=fuse, winograd=winograd, channels_last=channels_last,
        batch_views=batch_views, amp=amp))

    def once(imgs, sz):
        with torch.inference_mode():
            return (infer.cams_fast if fast else infer.cams_reference)(m, imgs, label, sz)

    small = [torch.nn.functional.interpolate(i[None], scale_factor=0.25)[0] for i in images]
    once(small, tuple(s // 4 for s in size))
    return lambda: once(images, size)


def timed(fn, device: torch.device) -> Tuple[float, float, tuple]:
    """(wall s, CPU s of this process, result) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, out


def run(args) -> Tuple[str, List[Dict]]:
    width, height = (160, 120) if args.quick else (500, 375)
    reps = 2 if args.quick else 1   # a full-size round takes about 4 minutes on 2 cores
    devices = [torch.device("cpu")]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    pil = synthetic_image(width, height)
    images = [torch.from_numpy(a) for a in multiscale_arrays(pil, INFER_SCALES)]
    label = torch.zeros(NUM_CLASSES)
    label[list(LABEL_CLASSES)] = 1
    size = (height, width)
    rows = []
    for device in devices:
        model = make_model(device)
        cpu = device.type == "cpu"
        variants = [
            ("reference: 8 views, batch 1 (published loop, --no-fast)", dict(fast=False)),
            ("fast: pair sum at feature res., present classes only, NCHW",
             dict(fast=True, channels_last=False, batch_views=False)),
            ("fast + channels_last" + (" (--no-fuse)" if cpu else ""),
             dict(fast=True, channels_last=True, batch_views=False)),
            ("fast + channels_last + flip pair as one batch" + ("" if cpu else " (CUDA default)"),
             dict(fast=True, channels_last=True, batch_views=True))]
        if cpu:
            variants.append(("fast + fused network: conv-BN folded, frozen TorchScript, "
                             "pre-packed oneDNN (--no-winograd)",
                             dict(fast=True, channels_last=False, batch_views=False, fuse=True)))
            variants.append(("fast + fused network: conv-BN folded, Winograd F(2x2,3x3) for "
                             ">= 256 channels, other convs pre-packed (CPU default)",
                             dict(fast=True, channels_last=False, batch_views=False, fuse=True,
                                  winograd=True)))
        if not cpu:
            variants.append(("fast + channels_last + batch + AMP fp16 (--amp)",
                             dict(fast=True, channels_last=True, batch_views=True, amp=True)))
        layouts = {False: model, True: copy.deepcopy(model)}
        runners = [(name, make_runner(layouts[kw.get("channels_last", False)], images, label, size,
                                      device, **kw)) for name, kw in variants]
        # Round-robin repetitions, best of each: load changes on a shared machine then hit every
        # variant alike instead of whichever happened to run during a busy minute.
        best: Dict[str, list] = {name: [float("inf"), float("inf"), None] for name, _ in runners}
        for _ in range(reps):
            for name, fn in runners:
                wall, cpu_s, out = timed(fn, device)
                b = best[name]
                b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu_s), out
        ref_name = runners[0][0]
        ref_wall, ref_cpu, (_, ref_cams, _) = best[ref_name]
        ref_mask = camlib.pseudo_mask(*best[ref_name][2][:2], thr=camlib.DEFAULT_THR).cpu()
        for name, _ in runners:
            wall, cpu_s, (keys, cams, _) = best[name]
            mask = camlib.pseudo_mask(keys, cams, thr=camlib.DEFAULT_THR).cpu()
            rows.append({
                "device": device.type, "network": NETWORK, "image": f"{width}x{height}", "path": name,
                "s/image": wall, "speed-up (wall)": ref_wall / wall,
                "CPU s/image": cpu_s if cpu else None, "speed-up (CPU)": ref_cpu / cpu_s if cpu else None,
                "max |dCAM|": float((cams.float().cpu() - ref_cams.float().cpu()).abs().max()),
                "mask px differing": int((mask != ref_mask).sum()),
            })
    return (f"infer: CAMs of one image, {NETWORK}, scales {list(INFER_SCALES)} x flip", rows)
