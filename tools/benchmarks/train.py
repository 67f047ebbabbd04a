"""Benchmark section "train": one training step (forward, EPS + cls loss, backward, SGD) on
synthetic batches, for ResNet-38 and the small backbone.

Rows compare a straightforward re-implementation of the published loop (NCHW, fp32, the
published EPS loss formulation with boolean-mask indexing, PolyOptimizer semantics, a
``loss.item()`` per step) with train.py's step (the head's ``losses`` + ``set_poly_lr``) under
its flags: channels_last (same fp32 math), AMP (bf16 / fp16) and trunk checkpointing.
``speedup`` is the published loop's median step time over the row's, measured in the same
process, interleaved rep by rep to share the machine's noise; on the CPU ``cpu_s`` /
``speedup_cpu`` use the CPU seconds of all threads instead, which other load on a shared machine
disturbs much less than wall time. "train.py NCHW fp32" is the identical-math comparison.
Data loading is excluded (the published pipeline runs in DataLoader workers). Peak memory of a
row: above what was allocated before its model was built (CUDA max_memory_allocated; on the CPU
the peak RSS, VmHWM reset through /proc/self/clear_refs; blank where that is not allowed), so it
covers the model, its gradients and the step's activations.

    python tools/benchmark.py --only train [--quick] [--device all]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the top-level train.py, not this file

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from network import build_network  # noqa: E402
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
# measurement
# ---------------------------------------------------------------------------------------------
def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak(device):
    """Start a peak-memory window; returns the baseline (MB) or None when not measurable.
    The earlier rows' models stay alive, so a row reports its peak ABOVE this baseline."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) of this process to the current RSS
        return _proc_status_mb("VmRSS")
    except OSError:
        return None


def _peak_mb(device, baseline):
    if baseline is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20 - baseline
    peak = _proc_status_mb("VmHWM")
    return None if peak is None else peak - baseline


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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


def _time_rows(arch, crop, batch, variants, device, warmup, reps):
    """Build every variant, then time them round-robin (rep by rep) so that load changes on a
    shared machine hit all variants alike; median step time per variant."""
    img, sal, label = _batch(batch, crop, device)
    loops, times, peaks = [], [[] for _ in variants], []
    for v in variants:
        ok = _reset_peak(device)
        loop, mf = _make(arch, v, device)
        x = img.contiguous(memory_format=mf)
        for _ in range(warmup):
            loop.step(x, sal, label)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peaks.append(_peak_mb(device, ok))
        loops.append((loop, x))
    cpu_times = [[] for _ in variants]
    for _ in range(reps):
        for i, (loop, x) in enumerate(loops):
            t, c = time.perf_counter(), _cpu_seconds()
            out = loop.step(x, sal, label)
            if isinstance(out, torch.Tensor):
                out.item()  # count the same host sync in both loops
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t)
            cpu_times[i].append(_cpu_seconds() - c)
    base = statistics.median(times[0])
    base_cpu = statistics.median(cpu_times[0])
    rows = []
    for v, ts, cs, peak in zip(variants, times, cpu_times, peaks):
        step, cpu = statistics.median(ts), statistics.median(cs)
        row = {"device": device.type, "network": f"{arch}_eps", "crop": crop, "batch": batch,
               "loop": v["name"], "step_s": step, "images_per_s": batch / step,
               "speedup": base / step}
        if device.type == "cpu":  # CPU seconds of all threads: robust to other load on the machine
            row.update(cpu_s=cpu, speedup_cpu=base_cpu / cpu)
        row["peak_mem_mb"] = peak
        rows.append(row)
    return rows


CPU_VARIANTS = [
    {"name": "published (NCHW fp32)", "loop": "published"},
    {"name": "train.py NCHW fp32", "loop": "ours"},
    {"name": "train.py channels_last fp32", "loop": "ours", "channels_last": True},
    {"name": "train.py bf16 autocast", "loop": "ours", "amp": "bf16"},
    {"name": "train.py fp32 + checkpointing", "loop": "ours", "checkpointing": True},
]
CUDA_VARIANTS = CPU_VARIANTS[:3] + [
    {"name": "train.py channels_last bf16", "loop": "ours", "channels_last": True, "amp": "bf16"},
    {"name": "train.py channels_last fp16", "loop": "ours", "channels_last": True, "amp": "fp16"},
    {"name": "train.py channels_last + checkpointing", "loop": "ours", "channels_last": True,
     "checkpointing": True},
]


def run(args):
    quick = getattr(args, "quick", False)
    rows = []
    warmup, reps = (1, 2) if quick else (2, 7)
    if args.device in ("cpu", "all"):
        cpu = torch.device("cpu")
        variants = CPU_VARIANTS[:3] if quick else CPU_VARIANTS
        rows += _time_rows("small", 64 if quick else 96, 8, variants, cpu, warmup, reps)
        rows += _time_rows("resnet38", 64 if quick else 128, 1 if quick else 2, variants, cpu,
                           warmup, reps)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        gpu = torch.device("cuda")
        crop, batch = (224, 4) if quick else (448, 8)
        rows += _time_rows("resnet38", crop, batch, CUDA_VARIANTS, gpu, warmup, reps if not quick else 3)
    return "Training step (train.py vs the published loop)", rows


if __name__ == "__main__":
    from tools.benchmark import markdown_table
    ns = argparse.Namespace(device="all", quick="--quick" in sys.argv, threads=torch.get_num_threads())
    title, table = run(ns)
    print(f"## {title}\n\n{markdown_table(table)}")
