"""The benchmark driver runs a section and prints a markdown table with the machine header
(no timing assertions: targets live in the benchmark's output, not in tests)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.benchmarks import SECTIONS
from tools.benchmarks import data as data_bench
from tools.benchmarks.measure import PeakMemory, Timing, bench_devices, time_calls

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(*argv, timeout=300):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "tools/benchmark.py", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_benchmark_prints_markdown_tables(tmp_path):
    out = tmp_path / "bench.md"
    proc = run_benchmark("--only", "eval", "--quick", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "torch " in text and "threads 1" in text
    assert "## Evaluator" in text
    assert "| task | workers | images | seconds | images/s |" in text


def test_data_section_quick_and_json(tmp_path):
    """The data section on generated VOC-size files: a per-worker rate for the training and the
    inference pipeline, the real loader's rate, and the headroom over a given GPU rate."""
    out = tmp_path / "bench.json"
    proc = run_benchmark("--only", "data", "--quick", "--threads", "1", "--gpu-images-per-s",
                         "10", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "## Data loading: images/s per DataLoader worker" in proc.stdout
    record = json.loads(out.read_text())
    assert record["machine"]["cores"] == os.cpu_count() and "torch" in record["machine"]
    rows = record["sections"]["data"]["rows"]
    workers = {r["variant"]: r for r in rows if r["variant"]}
    assert set(workers) == {"train_worker", "infer_worker"}
    assert all(r["images/s"] > 0 for r in workers.values())
    headroom = [r for r in rows if r["headroom"] is not None]
    assert len(headroom) == 1 and headroom[0]["workers"] == 8
    assert headroom[0]["headroom"] == pytest.approx(8 * workers["train_worker"]["images/s"] / 10)
    assert headroom[0]["target"].startswith(">= 2x: ")


def test_data_headroom_reads_the_train_and_infer_cuda_rows():
    """Run after the train and infer sections, the data section compares with their CUDA rows
    at the VOC recipe (default and fastest training rows, the default inference path)."""
    results = {"train": [
        {"device": "cuda", "crop": 448, "batch": 8, "variant": "default", "flags": "train.py",
         "images_per_s": 20.0},
        {"device": "cuda", "crop": 448, "batch": 8, "variant": "bf16_cl", "flags": "--amp bf16",
         "images_per_s": 80.0},
        {"device": "cuda", "crop": 321, "batch": 16, "variant": "default", "images_per_s": 99.0},
        {"device": "cpu", "crop": 448, "batch": 8, "variant": "default", "images_per_s": 1.0}],
        "infer": [{"device": "cuda", "variant": "default", "image": "500x375", "s/image": 0.25},
                  {"device": "cuda", "variant": "default", "image": "640x480", "s/image": 0.5}]}
    args = argparse.Namespace(results=results, gpu_images_per_s=None)
    assert [c["rate"] for c in data_bench.train_consumers(args)] == [20.0, 80.0]
    assert data_bench.infer_consumer(args)["rate"] == 4.0
    rows = data_bench._headroom_rows("train", 10.0, 8, data_bench.train_consumers(args))
    assert [r["headroom"] for r in rows] == [4.0, 1.0]
    assert rows[0]["target"] == ">= 2x: met" and rows[1]["target"] == ">= 2x: NOT met"
    given = argparse.Namespace(results=results, gpu_images_per_s=5.0)
    assert data_bench.train_consumers(given) == [{"consumer": "--gpu-images-per-s", "rate": 5.0}]


def test_sections_are_registered_with_data_last():
    assert list(SECTIONS)[-1] == "data" and {"train", "infer"} <= set(SECTIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_device_cuda_without_a_gpu_is_one_line_error():
    proc = run_benchmark("--only", "train", "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark.py: error: --device cuda:")
    assert "## Training step" not in proc.stdout


def test_device_selection():
    assert bench_devices("cpu") == [torch.device("cpu")]
    all_devices = [d.type for d in bench_devices("all")]
    assert all_devices[0] == "cpu" and all_devices[1:] == (["cuda"] if torch.cuda.is_available() else [])


def test_timing_and_peak_memory_on_the_cpu():
    calls = []
    timing, peak = time_calls(lambda: calls.append(1) or len(calls), torch.device("cpu"),
                              warmup=2, reps=5)
    assert len(calls) == 7 and timing.reps == 5 and timing.result == 7
    assert timing.min <= timing.median
    assert isinstance(timing, Timing) and isinstance(peak, PeakMemory)
    with PeakMemory(torch.device("cpu")) as big:
        block = bytearray(200 * 2 ** 20)  # 200 MB touched: the resident set grows
        block[::4096] = b"x" * len(block[::4096])
    if big.alloc_mb is not None:  # None where /proc/self/clear_refs cannot be written
        assert big.alloc_mb > 150
