"""The benchmark driver runs a section and prints a markdown table with the machine header
(no timing assertions: targets live in the benchmark's output, not in tests)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
def test_benchmark_prints_markdown_tables(tmp_path):
    out = tmp_path / "bench.md"
    proc = run_benchmark("--only", "eval", "--quick", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "torch " in text and "threads 1" in text
    assert "## Evaluator" in text
    assert "| task | workers | images | seconds | images/s |" in text


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------- the "published" section
def _fake_eps_tree(root: Path, drop: str = None) -> Path:
    """The few lines of an EPS checkout that the patches change (no EPS code is in this repo)."""
    from tools.benchmarks.published import INFER_PATCHES
    texts = {}
    for rel, old, _, _ in INFER_PATCHES:
        if old != drop:
            texts[rel] = texts.get(rel, "") + f"line with {old}\n"
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "evaluate_png.py").write_text("print('eval')\n")
    (root / ".git").mkdir()
    return root


def test_published_patches_apply_and_a_different_checkout_is_one_error(tmp_path):
    from tools.benchmarks.published import INFER_PATCHES, PatchError, patched_eps_copy
    src = _fake_eps_tree(tmp_path / "eps")
    dst = patched_eps_copy(src, tmp_path / "copy")
    assert not (dst / ".git").exists() and (dst / "evaluate_png.py").is_file()
    for rel, old, new, _ in INFER_PATCHES:
        text = (dst / rel).read_text()
        assert old not in text or old in new  # "Image.CUBIC" is inside "PIL.Image.CUBIC"
    assert ".cuda(" not in (dst / "infer.py").read_text()
    assert "np.array([c[0] for c in cam_list])" in (dst / "infer.py").read_text()
    assert (src / "infer.py").read_text() != (dst / "infer.py").read_text()  # the copy only
    other = _fake_eps_tree(tmp_path / "other", drop="Image.CUBIC")
    with pytest.raises(PatchError, match=r"infer.py has no 'Image.CUBIC' to change"):
        patched_eps_copy(other, tmp_path / "copy2")
    with pytest.raises(PatchError, match="no infer.py"):
        patched_eps_copy(tmp_path / "nowhere", tmp_path / "copy3")


def test_published_runs_interleave_and_ratios_are_of_medians():
    from tools.benchmarks.published import interleaved, summary_rows
    order = []
    times = {"ref": iter([(10.0, 20.0), (12.0, 22.0), (14.0, 30.0)]),
             "ours": iter([(5.0, 10.0), (6.5, 11.0), (7.0, 40.0)])}
    runs = interleaved({k: (lambda k=k: order.append(k) or next(times[k])) for k in times}, reps=3)
    assert order == ["ref", "ours", "ours", "ref", "ref", "ours"]  # ABBA: load falls on both
    rows = summary_rows("t", 2, runs, "ours", ["ref"], 1.5, load=1.0, same={"ref": "yes"})
    ref, ours = rows
    assert ref["program"] == "ref" and ref["speed-up CPU"] is None
    assert ours["vs"] == "ref" and ours["speed-up wall"] == pytest.approx(12 / 6.5)
    assert ours["speed-up CPU"] == pytest.approx(22 / 11)
    assert ours["target"] == ">= 1.5x: CPU met, wall met" and ours["same result"] == "yes"
    slow = summary_rows("t", 2, runs, "ours", ["ref"], 2.0, load=1.0)
    assert slow[1]["target"] == ">= 2x: CPU met, wall NOT met"  # 22 / 11 = 2, 12 / 6.5 < 2
    quick = summary_rows("t", 2, runs, "ours", ["ref"], 3.0, load=1.0, verdict=False)
    assert quick[1]["target"] == ">= 3x: no verdict (--quick)"


def test_reference_evaluator_writes_the_same_table_as_evaluate(tmp_path):
    # tools/benchmarks/ref_eval.py (the published evaluation process, for timing) must compute
    # what evaluate.py computes, or the ratio compares two different jobs
    from tools.benchmarks.published import tables_differ
    from utils.io import save_label_png
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(3)]
    for i in ids:
        gt = rng.choice([0, 1, 15, 255], size=(7, 9)).astype(np.uint8)
        save_label_png(tmp_path / "gt" / f"{i}.png", gt)
        save_label_png(tmp_path / "pred" / f"{i}.png", rng.choice([0, 1, 15], size=(7, 9)))
    (tmp_path / "list.txt").write_text("\n".join(ids) + "\n")
    flags = ["--dataset", "voc12", "--datalist", tmp_path / "list.txt", "--gt_dir",
             tmp_path / "gt", "--pred_dir", tmp_path / "pred"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for script, out in (("tools/benchmarks/ref_eval.py", "ref.txt"), ("evaluate.py", "ours.txt")):
        r = subprocess.run([sys.executable, script, *map(str, flags), "--save_path",
                            str(tmp_path / out)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert tables_differ(tmp_path / "ours.txt", tmp_path / "ref.txt") == "yes"


@pytest.mark.slow
def test_published_section_quick_runs_both_programs_with_the_same_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_benchmark("--only", "published", "--quick", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["sections"]["published"]["rows"]
    ours = [r for r in rows if r["vs"]]
    assert {r["program"] for r in ours} == {"infer.py", "evaluate.py"}
    assert all(r["same result"] == "yes" and r["speed-up CPU"] > 0 for r in ours), ours
    assert all("no verdict" in r["target"] for r in ours)
