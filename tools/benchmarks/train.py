"""Benchmark section "train": one training step (forward, EPS + cls loss, backward, SGD) on
synthetic batches, for ResNet-38 and the small backbone.

Rows compare a straightforward re-implementation of the published loop (NCHW, fp32, the
published EPS loss formulation with boolean-mask indexing, PolyOptimizer semantics, a
``loss.item()`` per step) with train.py's step (the head's ``losses`` + ``set_poly_lr``) under
its flags, named in the ``flags`` column exactly as they are passed to train.py.
``speedup`` is the published loop's median step time over the row's. "train.py (defaults)" is
the identical-math comparison. Data loading is excluded (the published pipeline runs in
DataLoader workers; the "data" section measures what they supply).

CPU rows (small backbone and ResNet-38 at small crops): the variants are built first and timed
round-robin, rep by rep, so that load changes on a shared machine hit all of them alike;
``cpu_s`` / ``speedup_cpu`` use the CPU seconds of all threads, which other load disturbs much
less than wall time. ``peak_alloc_mb``: growth of the peak resident set while the row's model
was built and warmed up (model, gradients, momentum, one step's activations).

CUDA rows (ResNet-38 EPS at the VOC recipe's batch 8 / crop 448 and the COCO recipe's
batch 16 / crop 321): one variant at a time, with the numerics train.py sets for those flags
(utils.device.configure_numerics: TF32 off unless ``--tf32``, cudnn.benchmark off unless
``--cudnn-benchmark``), 2 warm-up steps, then >= 5 steps each between two
torch.cuda.synchronize calls (tools/benchmarks/measure.py); median and min. Memory from an
empty allocator: ``peak_alloc_mb`` (tensors: weights, gradients, momentum, activations),
``peak_reserved_mb`` (what the caching allocator took) and ``gpu_need_mb`` = reserved + the CUDA
context and library workspaces, the number to compare with a GPU's memory. A variant that does
not fit is a row with its error, not a crash.

    python tools/benchmark.py --only train [--quick] [--device cpu|cuda|all]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the top-level train.py, not this file

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from network import build_network  # noqa: E402
from tools.benchmarks.measure import (CUDA_REPS, CUDA_WARMUP, PeakMemory, Timing,  # noqa: E402
                                      bench_devices, cuda_overhead_mb, free_cuda, oom_errors,
                                      time_calls)
from utils.optim import build_optimizer, set_poly_lr  # noqa: E402

NUM_CLASSES = 20
TAU, LAM = 0.4, 0.5


# ---------------------------------------------------------------------------------------------
# the published loop, written out (EPS module/train.py train_eps, eps.py get_eps_loss)
# ---------------------------------------------------------------------------------------------
def published_eps_loss(cam, sal, label, tau, lam):
    """The published formulation: boolean label maps over (N, C+1, h, w) and masked copies."""
    b, c1, h, w = cam.shape
    c = c1 - 1
    sal = F.interpolate(sal, size=(h, w))
    label_map = label.view(b, c, 1, 1).expand(b, c, h, w).bool()
    fg_sel = torch.zeros(b, c1, h, w, dtype=torch.bool, device=cam.device)
    bg_sel = torch.zeros(b, c1, h, w, dtype=torch.bool, device=cam.device)
    bg_sel[:, c] = True
    prob = F.softmax(cam, dim=1)
    rounded = torch.round(prob[:, :-1].detach())
    ratio = (rounded * torch.round(sal)).view(b, c, -1).sum(-1) / (rounded + 1e-4).view(b, c, -1).sum(-1)
    valid = (ratio > tau).view(b, c, 1, 1).expand(b, c, h, w)
    fg_sel[:, :-1] = label_map & valid
    bg_sel[:, :-1] = label_map & ~valid
    fg = torch.zeros_like(prob)
    bg = torch.zeros_like(prob)
    fg[fg_sel] = prob[fg_sel]
    bg[bg_sel] = prob[bg_sel]
    pred = fg.sum(1, keepdim=True) * lam + (1 - bg.sum(1, keepdim=True)) * (1 - lam)
    return F.mse_loss(pred, sal)


class PublishedLoop:
    """Model in NCHW fp32, SGD with weight decay in the momentum slot, lr set per step, with the
    PyTorch 1.x semantics the published code ran under: zero_grad() zero-fills the gradients
    (backward then accumulates into them) and SGD loops over the parameters one by one."""

    def __init__(self, model, max_iters):
        groups = model.get_parameter_groups()
        self.opt = torch.optim.SGD([{"params": g["params"], "lr": 0.01 * g["lr_mult"],
                                     "weight_decay": 5e-4 * g["weight_decay_mult"]} for g in groups],
                                   0.01, 5e-4,  # positional, as published: momentum = 5e-4
                                   foreach=False)
        self.init_lr = [g["lr"] for g in self.opt.param_groups]
        self.model, self.max_iters, self.it = model, max_iters, 0

    def step(self, img, sal, label):
        pred, cam = self.model(img)
        loss = F.multilabel_soft_margin_loss(pred[:, :-1], label) + \
            published_eps_loss(cam, sal, label, TAU, LAM)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        f = (1 - self.it / self.max_iters) ** 0.9
        for g, lr0 in zip(self.opt.param_groups, self.init_lr):
            g["lr"] = lr0 * f
        self.opt.step()
        self.it += 1
        return loss.item()  # the published average meter reads the loss every step


class OurLoop:
    """train.py's step: poly lr + the head's losses (network/heads.py) + fused SGD (utils.optim)
    + gradients set to None instead of zero-filled + GradScaler (a no-op unless fp16)."""

    def __init__(self, model, max_iters, device, amp: str, channels_last: bool):
        self.model, self.max_iters, self.it, self.device = model, max_iters, 0, device
        self.opt = build_optimizer(model.get_parameter_groups(), 0.01, 5e-4)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(self, img, sal, label):
        set_poly_lr(self.opt, self.it, self.max_iters)
        with self.autocast:
            out = self.model(img.contiguous(memory_format=self.fmt))
        loss = sum(self.model.losses(out, label, sal, tau=TAU, lam=LAM).values())
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.it += 1
        return loss.detach()


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def _batch(n, crop, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 3, crop, crop, generator=g)
    sal = (torch.rand(n, 1, crop, crop, generator=g) > 0.6).float()
    label = torch.zeros(n, NUM_CLASSES)
    label[torch.arange(n), torch.randint(0, NUM_CLASSES, (n,), generator=g)] = 1
    return img.to(device), sal.to(device), label.to(device)


def _make(arch, variant, device):
    """(loop, input memory format) for one row's settings."""
    torch.manual_seed(0)
    model = build_network(f"{arch}_eps", NUM_CLASSES, checkpointing=variant.get("checkpointing", False))
    model.to(device).train()
    if variant["loop"] == "published":
        return PublishedLoop(model, 1000), torch.contiguous_format
    cl = variant.get("channels_last", False)
    if cl:
        model.to(memory_format=torch.channels_last)
    return OurLoop(model, 1000, device, variant.get("amp", "off"), cl), \
        (torch.channels_last if cl else torch.contiguous_format)


def _step_fn(loop, x, sal, label):
    def step():
        out = loop.step(x, sal, label)
        if isinstance(out, torch.Tensor):
            out.item()  # count the same host sync in both loops (the published one reads it)
    return step


def _row(device, arch, crop, batch, v, timing: Timing, warmup, base_median, base_cpu=None):
    step = timing.median
    row = {"device": device.type, "network": f"{arch}_eps", "crop": crop, "batch": batch,
           "variant": v["id"], "flags": v["flags"], "step_s": step, "min_s": timing.min,
           "reps": timing.reps, "warmup": warmup, "images_per_s": batch / step,
           "speedup": base_median / step if base_median else None}
    if device.type == "cpu":  # CPU seconds of all threads: robust to other load on the machine
        cpu = timing.cpu_median
        row.update(cpu_s=cpu, speedup_cpu=base_cpu / cpu if base_cpu else None)
    return row


def _cpu_rows(arch, crop, batch, variants, warmup, reps):
    """Build every variant (peak memory of build + warm-up), then time them round-robin."""
    device = torch.device("cpu")
    img, sal, label = _batch(batch, crop, device)
    steps, peaks = [], []
    for v in variants:
        with PeakMemory(device) as peak:
            loop, mf = _make(arch, v, device)
            step = _step_fn(loop, img.contiguous(memory_format=mf), sal, label)
            for _ in range(warmup):
                step()
        steps.append(step)
        peaks.append(peak.alloc_mb)
    timings = [Timing() for _ in variants]
    for _ in range(reps):
        for step, timing in zip(steps, timings):
            timing.add(step, device)
    base, base_cpu = timings[0].median, timings[0].cpu_median
    rows = []
    for v, timing, peak in zip(variants, timings, peaks):
        row = _row(device, arch, crop, batch, v, timing, warmup, base, base_cpu)
        row["peak_alloc_mb"] = peak
        rows.append(row)
    return rows


def _cuda_rows(arch, crop, batch, variants, device, warmup, reps):
    """One variant at a time from an empty allocator, with train.py's numerics for its flags."""
    from utils.device import configure_numerics

    img, sal, label = _batch(batch, crop, device)
    rows, base = [], None
    for v in variants:
        free_cuda(device)
        try:
            configure_numerics(device, tf32=v.get("tf32", False),
                               cudnn_benchmark=v.get("cudnn_benchmark", False),
                               amp=v.get("amp", "off"))
            with PeakMemory(device) as peak:
                loop, mf = _make(arch, v, device)
                timing, _ = time_calls(_step_fn(loop, img.contiguous(memory_format=mf), sal, label),
                                       device, warmup, reps, memory=False)
            del loop
        except oom_errors() as e:
            rows.append({"device": device.type, "network": f"{arch}_eps", "crop": crop,
                         "batch": batch, "variant": v["id"], "flags": v["flags"],
                         "error": "out of memory: " + str(e).splitlines()[0][:80]})
            continue
        except Exception as e:  # noqa: BLE001 - e.g. bf16 refused on a pre-Ampere GPU
            rows.append({"device": device.type, "network": f"{arch}_eps", "crop": crop,
                         "batch": batch, "variant": v["id"], "flags": v["flags"],
                         "error": (str(e).splitlines() or [type(e).__name__])[0][:120]})
            continue
        if v["loop"] == "published":
            base = timing.median
        row = _row(device, arch, crop, batch, v, timing, warmup, base)
        overhead = cuda_overhead_mb(device)
        row.update(peak_alloc_mb=peak.alloc_mb, peak_reserved_mb=peak.reserved_mb,
                   gpu_need_mb=peak.reserved_mb + overhead if overhead is not None else None)
        rows.append(row)
    free_cuda(device)
    configure_numerics(device)  # leave train.py's default numerics for the next section
    return rows


PUBLISHED = {"id": "published", "flags": "published loop (NCHW fp32)", "loop": "published"}
DEFAULT = {"id": "default", "flags": "train.py (defaults: NCHW fp32)", "loop": "ours"}
CPU_VARIANTS = [
    PUBLISHED, DEFAULT,
    {"id": "channels_last", "flags": "--channels-last", "loop": "ours", "channels_last": True},
    {"id": "bf16", "flags": "--amp bf16", "loop": "ours", "amp": "bf16"},
    {"id": "checkpointing", "flags": "--checkpointing", "loop": "ours", "checkpointing": True},
]
BF16_CL = {"id": "bf16_cl", "flags": "--amp bf16 --channels-last", "loop": "ours", "amp": "bf16",
           "channels_last": True}
CUDA_VARIANTS = CPU_VARIANTS[:3] + [
    {"id": "tf32", "flags": "--tf32", "loop": "ours", "tf32": True},
    CPU_VARIANTS[3],
    BF16_CL,
    {"id": "bf16_cl_bench", "flags": "--amp bf16 --channels-last --cudnn-benchmark", "loop": "ours",
     "amp": "bf16", "channels_last": True, "cudnn_benchmark": True},
    {"id": "fp16_cl", "flags": "--amp fp16 --channels-last", "loop": "ours", "amp": "fp16",
     "channels_last": True},
    CPU_VARIANTS[4],
]
# The recipes the projections of the GPU check need (docs/training.md): VOC batch 8 / crop 448,
# COCO batch 16 / crop 321.
VOC_RECIPE, COCO_RECIPE = (448, 8), (321, 16)


def run(args):
    quick = getattr(args, "quick", False)
    rows = []
    for device in bench_devices(args.device):
        if device.type == "cpu":
            warmup, reps = (1, 2) if quick else (2, 7)
            variants = CPU_VARIANTS[:3] if quick else CPU_VARIANTS
            rows += _cpu_rows("small", 64 if quick else 96, 8, variants, warmup, reps)
            rows += _cpu_rows("resnet38", 64 if quick else 128, 1 if quick else 2, variants,
                              warmup, reps)
        else:
            reps = CUDA_REPS if quick else 2 * CUDA_REPS
            crop, batch = VOC_RECIPE
            variants = [PUBLISHED, DEFAULT, BF16_CL] if quick else CUDA_VARIANTS
            rows += _cuda_rows("resnet38", crop, batch, variants, device, CUDA_WARMUP, reps)
            if not quick:
                crop, batch = COCO_RECIPE
                rows += _cuda_rows("resnet38", crop, batch, [DEFAULT, BF16_CL], device,
                                   CUDA_WARMUP, reps)
    return "Training step (train.py vs the published loop)", rows


if __name__ == "__main__":
    from tools.benchmark import markdown_table
    ns = argparse.Namespace(device="all", quick="--quick" in sys.argv, threads=torch.get_num_threads())
    title, table = run(ns)
    print(f"## {title}\n\n{markdown_table(table)}")
