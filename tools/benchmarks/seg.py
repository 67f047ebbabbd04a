"""Benchmark section "seg": DeepLab-v2 (ResNet-101, MSC) inference seconds per image at VOC size
(500x375) and one training iteration of the published recipe.

What infer_seg.py does per image: the MSC network (scales 1, 0.75, 0.5, pixel-wise max), bilinear
upsampling to the image and softmax, the argmax on the network's device (rows "labels_host" /
"labels_device": COCO's 81 classes at 640x480, the host copy of the probabilities against the
device argmax), then optionally the dense CRF (DeepLab parameters, 21 labels, 10 iterations; on
the CPU whatever the network's device). What train_seg.py does per iteration:
--iter-size micro-batches of --batch-size crops (forward of the 4 MSC outputs, the summed CE,
backward), then one SGD step; published 5 x 2 at crop 321, fp32, cudnn.benchmark on. Weights
are random (timing does not depend on them).

CPU: the published ResNet-101 in NCHW and channels_last, and a training iteration at batch 1,
crop 161 (--quick: a quarter-size image, crop 65, one network layout); 3 repetitions after one
warm-up (1 with --quick). CUDA (tools/benchmarks/measure.py): 2 warm-up calls, then >= 5 calls
each between two torch.cuda.synchronize calls, median and min, peak memory above what was held
before; the inference also at COCO's typical 640x480, the training iteration at the published
5 x 2 / crop 321 in fp32 and with --amp bf16. VOC val (1,449 images) takes about
1,449 x (network + CRF) seconds per process.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from infer_seg import crf_labels, predict_probs, to_labels
from network.deeplab import build_deeplab
from tools.benchmarks.measure import (CUDA_REPS, CUDA_WARMUP, PeakMemory, bench_devices, free_cuda,
                                      oom_errors, time_calls)
from train_seg import BATCH_SIZE, ITER_SIZE, seg_loss
from utils.optim import build_optimizer

FULL = (375, 500)   # a typical VOC image (H, W)
COCO = (480, 640)   # a typical COCO image
QUICK = (94, 125)
N_CLASSES = 21
VOC_VAL = 1449


def _infer_row(model, device, h, w, fmt, warmup, reps, variant, reserved=False):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model.to(memory_format=mf)
    x = (torch.randn(1, 3, h, w, device=device) * 50).contiguous(memory_format=mf)
    timing, peak = time_calls(lambda: predict_probs(model, x), device, warmup, reps)
    row = {"stage": "DeepLab-v2 R101 MSC (3 scales), infer_seg.py", "input": f"{h}x{w}",
           "variant": variant, "device": device.type, "format": fmt, "threads": torch.get_num_threads(),
           "sec": timing.median, "min sec": timing.min, "reps": timing.reps,
           "VOC val (1449) min": VOC_VAL * timing.median / 60, "peak MB": peak.alloc_mb}
    if reserved:
        row["peak reserved MB"] = peak.reserved_mb
    return row


def _labels_rows(device, h, w, n_classes, warmup, reps):
    """The step after the network in infer_seg.py without the CRF: probabilities -> label PNG
    array. 'host': the (K,H,W) float32 probabilities copied to the host and argmax'd by numpy
    (before issue 19); 'device': argmax where they are, one uint8 per pixel copied (to_labels)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(n_classes, h, w, generator=g), 0).to(device)
    rows = []
    for variant, fn in (("host", lambda: probs.cpu().numpy().argmax(0).astype(np.uint8)),
                        ("device", lambda: to_labels(probs))):
        timing, _ = time_calls(fn, device, warmup, reps, memory=False)
        rows.append({"stage": f"probabilities -> labels ({n_classes} classes), {variant} argmax",
                     "input": f"{h}x{w}", "variant": f"labels_{variant}", "device": device.type,
                     "format": "-", "threads": torch.get_num_threads(), "sec": timing.median,
                     "min sec": timing.min, "reps": timing.reps,
                     "host MB": (n_classes * 4 if variant == "host" else 1) * h * w / 2 ** 20})
    rows[1]["speed-up"] = rows[0]["sec"] / max(rows[1]["sec"], 1e-12)
    return rows


def _train_row(device, crop, batch, iter_size, amp, warmup, reps):
    """One train_seg.py iteration (its loss and optimizer) on random crops and labels."""
    torch.manual_seed(0)
    with PeakMemory(device) as peak:
        model = build_deeplab("deeplabv2_resnet101", N_CLASSES).to(device).train()
        opt = build_optimizer(model.get_parameter_groups(), 2.5e-4, 5e-4, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(batch, 3, crop, crop, generator=g) * 50).to(device)
        y = torch.randint(0, N_CLASSES, (batch, crop, crop), generator=g).to(device)
        dtype = {"bf16": torch.bfloat16}.get(amp)

        def iteration():
            opt.zero_grad(set_to_none=True)
            for _ in range(iter_size):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    out = model(x)
                loss, _ = seg_loss(out, y)
                (loss / iter_size).backward()
            opt.step()

        timing, _ = time_calls(iteration, device, warmup, reps, memory=False)
    del model, opt
    flags = "train_seg.py (defaults)" + (f" --amp {amp}" if amp != "off" else "")
    row = {"stage": f"DeepLab-v2 R101 training iteration, {flags}",
           "input": f"{batch}x{iter_size} x {crop}x{crop}", "device": device.type,
           "format": "nchw", "threads": torch.get_num_threads(), "sec": timing.median,
           "min sec": timing.min, "reps": timing.reps, "peak MB": peak.alloc_mb,
           "variant": "train" if amp == "off" else f"train_{amp}",
           "20k iterations (h)": 20000 * timing.median / 3600}
    if device.type == "cuda":
        row["peak reserved MB"] = peak.reserved_mb
    return row


def run(args):
    quick = getattr(args, "quick", False)
    rows = []
    torch.manual_seed(0)
    for device in bench_devices(getattr(args, "device", "cpu")):
        cuda = device.type == "cuda"
        if cuda:
            from utils.device import configure_numerics
            configure_numerics(device, cudnn_benchmark=True)  # as published (and train_seg.py)
            warmup, reps = CUDA_WARMUP, CUDA_REPS if quick else 2 * CUDA_REPS
        else:
            warmup, reps = 1, 1 if quick else 3
        h, w = QUICK if quick else FULL
        model = build_deeplab("deeplabv2_resnet101", N_CLASSES).eval().to(device)
        for fmt in (["nchw"] if quick else ["nchw", "channels_last"]):
            rows.append(_infer_row(model, device, h, w, fmt, warmup, reps,
                                   "infer" if fmt == "nchw" else "infer_cl", reserved=cuda))
        if cuda and not quick:
            rows.append(_infer_row(model, device, *COCO, "nchw", warmup, reps, "infer_coco",
                                   reserved=True))
        del model
        # COCO's 81 classes: the argmax on the device (issue 19) against the host copy
        rows += _labels_rows(device, *(QUICK if quick else COCO), 81, warmup, reps)
        free_cuda(device)
        if cuda:
            settings = [(321, BATCH_SIZE, ITER_SIZE, amp) for amp in ("off", "bf16")]
        else:
            settings = [(65 if quick else 161, 1, 1, "off")]
        for crop, batch, iter_size, amp in settings:
            try:
                if cuda:
                    configure_numerics(device, cudnn_benchmark=True, amp=amp)
                rows.append(_train_row(device, crop, batch, iter_size, amp, warmup, reps))
            except oom_errors() as e:
                rows.append({"stage": f"DeepLab-v2 training, --amp {amp}", "device": device.type,
                             "error": "out of memory: " + str(e).splitlines()[0][:80]})
            except Exception as e:  # noqa: BLE001 - e.g. bf16 refused on a pre-Ampere GPU
                rows.append({"stage": f"DeepLab-v2 training, --amp {amp}", "device": device.type,
                             "error": (str(e).splitlines() or [type(e).__name__])[0][:120]})
            free_cuda(device)
        if cuda:
            configure_numerics(device)
    # CRF runs on the CPU whatever the network device is.
    h, w = QUICK if quick else FULL
    reps = 1 if quick else 3
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(N_CLASSES), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    try:
        crf_labels(rgb, probs, "rgb")
        t = time.perf_counter()
        for _ in range(reps):
            crf_labels(rgb, probs, "rgb")
        sec = (time.perf_counter() - t) / reps
        rows.append({"stage": "dense CRF (DeepLab params, 10 it), one process", "input": f"{h}x{w}",
                     "device": "cpu", "format": "-", "threads": 1, "sec": sec, "reps": reps,
                     "variant": "crf", "VOC val (1449) min": VOC_VAL * sec / 60})
    except ImportError as e:
        rows.append({"stage": f"dense CRF skipped ({e})", "input": f"{h}x{w}", "variant": "crf"})
    return "Segmentation (DeepLab-v2): inference seconds per image, training iteration", rows
