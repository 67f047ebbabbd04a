"""Benchmarks: one command that measures the project's speed targets and prints markdown tables.

    python tools/benchmark.py                          # every section, CPU rows
    python tools/benchmark.py --only eval              # one section
    python tools/benchmark.py --device cuda --json b.json   # CUDA rows, also as JSON
    python tools/benchmark.py --only published --eps-repo ../EPS   # ratios to the published code

Each section is a function ``run(args) -> (title, rows)`` in ``tools/benchmarks/<name>.py``;
rows are dicts, printed as one markdown table per section. ``--device cpu`` (default) runs the
CPU rows, ``cuda`` the CUDA rows only (a one-line error without a usable GPU), ``all`` both
(CUDA when present). The "eval" section measures the evaluator, which always runs on the CPU:
it runs for cpu/all, and so does "published" (whole processes against the published
programs: the ratios that show a regression the day it lands). The "data" section measures
DataLoader workers (CPU processes) against what the GPU consumes: it runs for every --device
and, run after "train" and "infer", reads their CUDA rows (``args.results``). Timing and memory rules: tools/benchmarks/measure.py.
Targets live here, never in timed unit tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from tools.benchmarks import SECTIONS  # noqa: E402
from tools.benchmarks.measure import cuda_environment  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.io import atomic_write_text  # noqa: E402


def markdown_table(rows) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0].keys())
    for r in rows[1:]:
        cols += [k for k in r if k not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine_header(threads: int, env: dict) -> str:
    if env.get("cuda"):
        gpus = "; ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, "
                         f"{g['memory_mib']} MiB)" for g in env["gpus"])
        cuda = (f"CUDA devices: {gpus}; driver {env.get('driver') or 'unknown'}, CUDA "
                f"{env['cuda']}, cuDNN {env['cudnn']}")
    else:
        cuda = f"CUDA device: none ({env.get('why')})"
    return (f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}; threads {threads}; {cuda}\n")


def get_args_parser():
    p = argparse.ArgumentParser("EPS benchmarks", add_help=False)
    p.add_argument("--only", type=str, nargs="*", default=None, choices=list(SECTIONS),
                   help=f"sections to run, in this order: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", type=str, default="cpu", choices=["cpu", "cuda", "all"],
                   help="rows to run: cpu, cuda (an error without a usable GPU) or all (CUDA "
                        "rows when a GPU is usable)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="fewer repetitions and smaller inputs on the CPU, fewer variants on CUDA "
                        "(a smoke run, not a measurement)")
    p.add_argument("--gpu-images-per-s", "--gpu_images_per_s", dest="gpu_images_per_s",
                   type=float, default=None,
                   help="data section: the training images/s the GPU consumes, for the headroom "
                        "of the data-loading workers (default: the train section's CUDA rows at "
                        "batch 8, crop 448, when it runs first)")
    p.add_argument("--eps-repo", type=Path, default=None,
                   help="published section: a checkout of github.com/halbielee/EPS; its infer.py "
                        "and evaluate_png.py then run too (from a patched temporary copy: CPU, "
                        "Pillow >= 10, numpy >= 1.24), besides tools/benchmarks/ref_*.py")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    p.add_argument("--json", type=Path, default=None,
                   help="also write every row as JSON here, rewritten after each section (a "
                        "section that fails or is killed keeps the earlier ones)")
    return p


def main(args):
    from tools.benchmarks.measure import bench_devices

    bench_devices(args.device)  # --device cuda without a usable GPU: one line, before any work
    torch.set_num_threads(args.threads)
    env = cuda_environment()
    text = "# Benchmarks\n\n" + machine_header(args.threads, env) + "\n"
    print(text, end="", flush=True)
    args.results = {}  # rows of the sections run so far, for later sections (data)
    record = {"machine": {"arch": platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, **env},
              "args": {"device": args.device, "quick": args.quick}, "sections": {}}
    # Registry order whatever the order on the command line: "data" reads "train" and "infer".
    for name in [n for n in SECTIONS if args.only is None or n in args.only]:
        title, rows = SECTIONS[name](args)
        args.results[name] = rows
        block = f"## {title}\n\n{markdown_table(rows)}\n"
        print(block, end="", flush=True)
        text += block
        record["sections"][name] = {"title": title, "rows": rows}
        if args.json:
            atomic_write_text(args.json, json.dumps(record, indent=1, default=str) + "\n")
        if args.out:
            atomic_write_text(args.out, text)


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
