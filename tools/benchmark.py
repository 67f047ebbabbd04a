"""Benchmarks: one command that measures the project's speed targets and prints markdown tables.

    python tools/benchmark.py                 # every section
    python tools/benchmark.py --only eval     # one section

Each section is a function ``run(args) -> (title, rows)`` in ``tools/benchmarks/<name>.py``;
rows are dicts with the same keys, printed as one markdown table. Targets live here, never in
timed unit tests.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from tools.benchmarks import SECTIONS  # noqa: E402
from utils.cli import run_cli  # noqa: E402


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


def machine_header(threads: int) -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}; threads {threads}; CUDA device: {cuda}\n")


def get_args_parser():
    p = argparse.ArgumentParser("EPS benchmarks", add_help=False)
    p.add_argument("--only", type=str, nargs="*", default=None, choices=sorted(SECTIONS),
                   help="sections to run (default: all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", type=str, default="cpu", choices=["cpu", "cuda", "all"],
                   help="where to run the model benchmarks; 'all' adds CUDA when present")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and smaller inputs (a smoke run, not a measurement)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    return p


def main(args):
    torch.set_num_threads(args.threads)
    text = "# Benchmarks\n\n" + machine_header(args.threads) + "\n"
    print(text, end="", flush=True)
    for name in (args.only or list(SECTIONS)):
        title, rows = SECTIONS[name](args)
        block = f"## {title}\n\n{markdown_table(rows)}\n"
        print(block, end="", flush=True)
        text += block
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
