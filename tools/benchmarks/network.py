"""Benchmark section "network": speed and memory of each backbone (EPS head).

Rows:
* eval forward, batch 1 at 448x448 (--quick: 128), NCHW vs channels_last, per backbone;
* one training step (forward, backward, SGD step; published freezing) of ResNet-38 at batch 1,
  same size, with and without activation checkpointing.

Method. Every row runs in a fresh subprocess, so allocator caches of one row cannot hide the
next row's memory. On the CPU, peak memory is the process's peak resident set size (VmHWM from
/proc/self/status) during the first (cold) run, minus the resident size just before it (after
the model was built): "peak_mib" is the extra memory the run needed (activations, gradients,
oneDNN workspaces). The HWM counter is reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0);
where that fails the absolute peak is reported and "peak_mib" is left empty. On CUDA,
torch.cuda.max_memory_allocated over the same cold run. Times are medians of the warm runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # worker mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TITLE = "Networks: forward time and peak memory per backbone; checkpointing in a training step"


# ------------------------------------------------------------------------------------------------
# worker (one configuration per process)
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(cfg: dict) -> dict:
    import torch

    from network import build_network

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda":  # the entry points' numerics: strict fp32 (no TF32), no autotuning
        from utils.device import configure_numerics
        configure_numerics(device)
    torch.manual_seed(0)
    # Each network's default freezing: published for the ResNets, BN trained for the small net.
    model = build_network(cfg["network"], 20, checkpointing=cfg["checkpointing"])
    memory_format = torch.channels_last if cfg["layout"] == "channels_last" else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device).contiguous(
        memory_format=memory_format)
    if cfg["mode"] == "train":
        model.train()
        groups = model.get_parameter_groups()
        opt = torch.optim.SGD([dict(params=g["params"], lr=1e-4 * g["lr_mult"]) for g in groups], lr=1e-4)

        def step():
            pred, cam = model(x)
            (pred.square().mean() + cam.mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Cold run: peak memory.
    rss_before = _status_kib("VmRSS")
    can_reset = _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()
    sync()
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_status_kib("VmHWM") - rss_before) / 1024 if can_reset else None
    rss_peak = _status_kib("VmHWM") / 1024
    # Warm runs: time.
    times = []
    for _ in range(cfg["reps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return dict(time_s=times[len(times) // 2], peak_mib=peak, rss_peak_mib=rss_peak)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _run_worker(cfg: dict) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1][:120])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _devices(args) -> list:
    from tools.benchmarks.measure import bench_devices

    return [d.type for d in bench_devices(args.device)]


def run(args):
    quick = bool(getattr(args, "quick", False))
    size = 128 if quick else 448
    reps = 1 if quick else 3
    rows = []
    for device in _devices(args):
        for backbone in ("resnet38", "resnet101", "small"):
            for layout in ("nchw", "channels_last"):
                cfg = dict(network=f"{backbone}_eps", mode="eval", layout=layout, checkpointing=False,
                           device=device, size=size, batch=1, reps=reps, threads=args.threads)
                rows.append(dict(backbone=backbone, mode="eval forward", layout=layout,
                                 checkpointing=False, device=device, input=f"1x3x{size}x{size}",
                                 **_run_worker(cfg)))
        # Checkpointing's effect on a training step (the GPU question is whether crop 448, batch 8
        # fits in 24 GB; on CPU batch 1 shows the ratio).
        train_net, train_size = "resnet38", size
        for ckpt in (False, True):
            cfg = dict(network=f"{train_net}_eps", mode="train", layout="nchw", checkpointing=ckpt,
                       device=device, size=train_size, batch=1, reps=reps, threads=args.threads)
            rows.append(dict(backbone=train_net, mode="train step", layout="nchw", checkpointing=ckpt,
                             device=device, input=f"1x3x{train_size}x{train_size}", **_run_worker(cfg)))
    return TITLE, rows


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
