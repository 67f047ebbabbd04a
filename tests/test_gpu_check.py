"""script/gpu_check.sh and its report (tools/gpu_check.py): the CPU dry run end to end, a failing
step that does not stop the others, and the projection formulas on known numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import gpu_check

REPO = Path(__file__).resolve().parents[1]
# Every variable the script reads: cleared so that nothing leaks in from the caller's shell.
SCRIPT_VARS = ("PYTHON DEVICE OUT DEADLINE NETWORK SEG_ARCH NUM_TRAIN NUM_VAL SIZE CROP RESIZE "
               "ITERS BATCH SEG_ITERS SEG_BATCH SEG_ITER_SIZE SEG_CROP SEG_LR SCALES WORKERS "
               "IO_WORKERS BENCH_ARGS NPROC").split()
PIPELINE = ["env", "tests", "data", "train", "infer", "evaluate", "train_seg", "infer_seg",
            "benchmark"]


def run_script(out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(PYTHON=sys.executable, DEVICE="cpu", OUT=str(out), OMP_NUM_THREADS="1",
                OMP_WAIT_POLICY="PASSIVE")
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(REPO / "script" / "gpu_check.sh")], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def steps(out: Path) -> dict:
    return {s["name"]: s for s in gpu_check.read_steps(out / "steps.tsv")}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("pytest_installed", [True, False], ids=["with-pytest", "without-pytest"])
def test_cpu_dry_run_runs_every_step_and_writes_the_report(tmp_path, hide_modules,
                                                          pytest_installed):
    """The dry run passes with pytest importable and without it (a bare GPU machine): then its
    tests step is skipped with the package named, and every other step still runs."""
    out = tmp_path / "check"
    hidden = {} if pytest_installed else {k: hide_modules("pytest")[k]
                                          for k in ("PYTHONPATH", "HIDDEN_MODULES")}
    proc = run_script(out, timeout=540, **hidden)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert report.strip() in proc.stdout  # printed as well as written
    s = steps(out)
    if not pytest_installed:
        assert s["tests"]["status"] == "skipped" and "pytest is not installed" in s["tests"]["note"]
        assert "all 15 steps passed or were skipped for a stated reason" in report
        assert json.loads((out / "env.json").read_text())["packages"]["pytest"] is None
        for name in PIPELINE:
            if name != "tests":
                assert s[name]["status"] == "pass", (name, s[name])
        return
    for name in PIPELINE:
        assert s[name]["status"] == "pass", (name, s[name])
        assert s[name]["seconds"] > 0 and s[name]["command"]
    for name in ("infer_crf", "infer_seg_crf"):  # run when pydensecrf is installed, else skipped
        assert s[name]["status"] in ("pass", "skipped"), s[name]
    for name in ("ddp_train", "ddp_infer", "ddp_train_seg", "ddp_infer_seg"):
        assert s[name]["status"] == "skipped" and "needs 2 GPUs" in s[name]["note"]
    assert report.startswith("# GPU check (CPU dry run)")
    for heading in ("## Environment", "## Steps", "## CUDA tests (tests/test_cuda.py)",
                    "## Targets", "## Projected wall time of the full recipes",
                    "## Benchmark (tools/benchmark.py)", "## Commands"):
        assert heading in report, heading
    assert "all 15 steps passed or were skipped for a stated reason" in report
    assert "small networks (small_eps, deeplabv2_small) instead of ResNet-38" in report
    assert "classifier = iterations x max(step s, batch / (8 workers x 1-worker images/s))" in report
    assert "| project modules | all import |" in report
    assert "skipped: needs CUDA" in report  # the CUDA tests, with their reason
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith("| ") and line.count("|") >= 5}
    assert "iterations, loss" in rows["train"] and "img/s" in rows["train"]
    assert "pseudo-mask mIoU" in rows["evaluate"] and "val mIoU" in rows["infer_seg"]
    bench = json.loads((out / "benchmark.json").read_text())
    assert list(bench["sections"]) == ["data"]
    assert (out / "runs" / "1gpu" / "cls" / "checkpoint_cls.pth").is_file()
    assert len(list((out / "runs" / "1gpu" / "deeplab" / "val").glob("*.png"))) == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("python", ["without-torch", "no-such-interpreter"])
def test_a_python_without_torch_is_one_line_before_any_step(tmp_path, hide_modules, python):
    """Only torch is required: a PYTHON that lacks it (or does not exist) is named in one line,
    exit 2, before the output folder is touched (not 15 failed steps and a report traceback)."""
    env = {k: hide_modules("torch")[k] for k in ("PYTHONPATH", "HIDDEN_MODULES")} \
        if python == "without-torch" else dict(PYTHON=str(tmp_path / "nope" / "python3"))
    out = tmp_path / "check"
    proc = run_script(out, timeout=60, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: PYTHON="), proc.stderr
    assert ("cannot import torch" if python == "without-torch" else "no such interpreter") in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()


@pytest.mark.slow
def test_a_failed_step_does_not_stop_the_others(tmp_path):
    """The dataset step fails: the stages that need its files are 'not run', the benchmark
    still runs (here it fails too), the report names both failures, the exit status is 1."""
    out = tmp_path / "check"
    proc = run_script(out, timeout=240, NUM_TRAIN="-1", BENCH_ARGS="--only no_such_section")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = steps(out)
    assert s["env"]["status"] == "pass" and s["tests"]["status"] == "pass"
    assert s["data"]["status"] == "FAIL" and "exit 2" in s["data"]["note"]
    assert s["train"]["status"] == "not run" and "train.txt" in s["train"]["note"]
    assert s["infer"]["status"] == "not run" and s["infer_seg"]["status"] == "not run"
    assert s["benchmark"]["status"] == "FAIL"  # it ran although the pipeline had failed
    report = (out / "gpu_check.md").read_text()
    assert "failed or did not run**: data, train" in report
    assert "benchmark" in report.split("\n\n")[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_step_cannot_push_the_check_past_its_bound(tmp_path):
    """The bound is DEADLINE + a killed step's 15 s grace + the report's 40 s (+ 5 s to kill
    it): with a training step that hangs forever and DEADLINE=40, the whole check, report
    included, ends within 40 + 15 + 40 + 5 s; the default DEADLINE keeps the same sum within
    8 minutes."""
    import re
    import time
    text = (REPO / "script" / "gpu_check.sh").read_text()
    default = int(re.search(r"DEADLINE=\$\{DEADLINE:-(\d+)\}", text).group(1))
    grace = int(re.search(r"timeout -k (\d+) \"\$limit\"", text).group(1))
    report_grace, report = map(int, re.search(
        r"timeout -k (\d+) (\d+) \"\$PYTHON\" tools/gpu_check.py report", text).groups())
    assert default + grace + report + report_grace <= 8 * 60
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *train.py*) exec sleep 1000;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "check"
    t0 = time.monotonic()
    proc = run_script(out, timeout=200, DEADLINE="40", PYTHON=str(wrapper),
                      BENCH_ARGS="--only no_such_section")
    wall = time.monotonic() - t0
    assert proc.returncode == 1 and (out / "gpu_check.md").is_file()
    assert wall <= 40 + grace + report + report_grace, wall
    s = steps(out)
    assert s["train"]["status"] == "FAIL" and "timed out" in s["train"]["note"]


def test_past_the_deadline_nothing_runs_and_the_check_fails(tmp_path):
    out = tmp_path / "check"
    proc = run_script(out, timeout=120, DEADLINE="0")
    assert proc.returncode == 1
    s = steps(out)
    assert set(x["status"] for x in s.values()) <= {"not run", "skipped"}
    assert "deadline" in s["env"]["note"]
    assert "# GPU check (CPU dry run)" in (out / "gpu_check.md").read_text()


# ------------------------------------------------------------------------------------------------
# projections on known numbers
# ------------------------------------------------------------------------------------------------
def bench_record(train_worker=50.0, infer_worker=20.0, need_mb=9000.0) -> dict:
    train = [
        dict(device="cuda", network="resnet38_eps", crop=448, batch=8, variant="published",
             flags="published loop (NCHW fp32)", step_s=0.55, images_per_s=8 / 0.55),
        dict(device="cuda", network="resnet38_eps", crop=448, batch=8, variant="default",
             flags="train.py (defaults: NCHW fp32)", step_s=0.5, images_per_s=16.0,
             peak_reserved_mb=need_mb - 500, gpu_need_mb=need_mb),
        dict(device="cuda", network="resnet38_eps", crop=448, batch=8, variant="bf16",
             flags="--amp bf16", step_s=0.12, images_per_s=8 / 0.12),
        dict(device="cuda", network="resnet38_eps", crop=448, batch=8, variant="bf16_cl",
             flags="--amp bf16 --channels-last", step_s=0.08, images_per_s=100.0),
        dict(device="cuda", network="resnet38_eps", crop=448, batch=8, variant="fp16_cl",
             error="out of memory"),
        dict(device="cuda", network="resnet38_eps", crop=321, batch=16, variant="default",
             flags="train.py (defaults: NCHW fp32)", step_s=0.6, images_per_s=16 / 0.6),
        dict(device="cuda", network="resnet38_eps", crop=321, batch=16, variant="bf16_cl",
             flags="--amp bf16 --channels-last", step_s=0.1, images_per_s=160.0)]
    infer = [dict(device="cuda", variant="reference", image="500x375", **{"s/image": 0.9}),
             dict(device="cuda", variant="default", image="500x375", **{"s/image": 0.2}),
             dict(device="cuda", variant="default", image="640x480", **{"s/image": 0.3})]
    seg = [dict(device="cuda", variant="infer", sec=0.05), dict(device="cuda", variant="infer_coco", sec=0.08),
           dict(device="cuda", variant="train", sec=0.3), dict(device="cuda", variant="train_bf16", sec=0.1),
           dict(device="cpu", variant="crf", sec=1.6)]
    data = [{"variant": "train_worker", "images/s": train_worker},
            {"variant": "infer_worker", "images/s": infer_worker},
            {"pipeline": "train", "workers": 8, "images/s": 8 * train_worker, "GPU consumer": "x",
             "GPU images/s": 16.0, "headroom": 8 * train_worker / 16.0, "target": ">= 2x: met"}]
    return {"sections": {k: {"rows": v} for k, v in
                         dict(train=train, infer=infer, seg=seg, data=data).items()}}


def by_stage(rows, recipe):
    return {r["stage"]: r for r in rows if r["recipe"] == recipe}


def test_projection_formulas():
    voc = by_stage(gpu_check.project(bench_record(), "cuda"), "VOC")
    fp32 = voc["classifier, train.py (defaults: NCHW fp32)"]
    assert fp32["seconds"] == pytest.approx(20000 * 0.5) and fp32["bound"] == "GPU"
    bf16 = voc["classifier, --amp bf16 --channels-last"]  # the fastest bf16 row
    assert bf16["seconds"] == pytest.approx(20000 * 0.08)
    pseudo = voc["pseudo-masks on train_aug (4 scales + flip)"]
    assert pseudo["seconds"] == pytest.approx(10582 * 0.2) and pseudo["bound"] == "GPU"
    assert voc["DeepLab-v2 training (5 x 2, crop 321)"]["seconds"] == pytest.approx(20000 * 0.3)
    assert voc["DeepLab-v2 on val (network)"]["seconds"] == pytest.approx(1449 * 0.05)
    assert voc["DeepLab-v2 on val (dense CRF, 8 processes)"]["seconds"] == pytest.approx(1449 * 1.6 / 8)
    coco = by_stage(gpu_check.project(bench_record(), "cuda"), "COCO")
    assert coco["classifier, train.py (defaults: NCHW fp32)"]["seconds"] == pytest.approx(256500 * 0.6)
    assert coco["pseudo-masks on train (4 scales + flip)"]["seconds"] == pytest.approx(82081 * 0.3)
    assert coco["DeepLab-v2 on val (network)"]["seconds"] == pytest.approx(40137 * 0.08)


def test_projection_is_data_bound_when_the_workers_are_slower():
    # 8 workers x 5 img/s = 40 img/s: 0.2 s per batch of 8 > the 0.08 s bf16 step
    voc = by_stage(gpu_check.project(bench_record(train_worker=5.0, infer_worker=1.0), "cuda"), "VOC")
    bf16 = voc["classifier, --amp bf16 --channels-last"]
    assert bf16["bound"] == "data loading" and bf16["seconds"] == pytest.approx(20000 * 8 / 40)
    pseudo = voc["pseudo-masks on train_aug (4 scales + flip)"]  # 2 workers x 1 img/s
    assert pseudo["bound"] == "data loading" and pseudo["seconds"] == pytest.approx(10582 * 0.5)


def test_totals_and_unmeasured_stages():
    rows = gpu_check.project(bench_record(), "cuda")
    totals = {(t["recipe"], t["with"]): t["total"] for t in gpu_check.totals(rows)}
    voc = 20000 * 0.5 + 10582 * 0.2 + 20000 * 0.3 + 1449 * 0.05 + 1449 * 1.6 / 8
    assert totals[("VOC", "classifier, train.py (defaults: NCHW fp32)")] == gpu_check.hms(voc)
    empty = gpu_check.project(None, "cuda")
    assert all(r["projected"] == "not measured" for r in empty)
    assert all(t["total"] == "not measured" for t in gpu_check.totals(empty))
    partial = bench_record()
    del partial["sections"]["seg"]
    t = gpu_check.totals(gpu_check.project(partial, "cuda"))[0]["total"]
    assert "+ what was not measured (3 of 5 stages)" in t


def test_targets():
    text = gpu_check.targets_section(bench_record(), "cuda")
    assert "fits one 24 GB GPU: **yes**: needs 9000 MiB" in text
    assert "with `--amp bf16 --channels-last`: 26.7 min" in text and "**met on this GPU**" in text
    assert "headroom 25.0x, >= 2x: met" in text
    too_big = gpu_check.targets_section(bench_record(need_mb=23500.0), "cuda")
    assert "fits one 24 GB GPU: **no**" in too_big
    assert "not measured" in gpu_check.targets_section(None, "cuda")


def test_report_status_from_the_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("env\tpass\t1.0\t\tpython x\n"
                                        "tests\tskipped\t0\tno GPU\t\n")
    text, status = gpu_check.render(tmp_path, "cuda")
    assert status == 0 and "all 2 steps passed" in text
    assert "not recorded (the env step did not run)" in text
    with open(tmp_path / "steps.tsv", "a") as f:
        f.write("train\tFAIL\t3.5\texit 2: train.py: error: bad\tpython train.py\n")
    text, status = gpu_check.render(tmp_path, "cuda")
    assert status == 1 and "1 of 3 steps failed or did not run**: train" in text
    assert "| train | FAIL | 3.5 | exit 2: train.py: error: bad |" in text


def test_report_of_a_gpu_run(tmp_path):
    """The report as a GPU run would leave it: versions, step results read from the runs, the
    CUDA tests with a failure, targets and projections from the benchmark rows."""
    out = tmp_path
    env = {"time": "2026-01-01 10:00:00", "host": "gpu1", "python": "3.12.3", "platform": "Linux",
           "cores": 16, "torch": "2.11.0+cu130", "shm_free_mib": 300,
           "packages": {"numpy": "2.5.0", "pydensecrf": None},
           "cuda_env": {"cuda": "13.0", "torch_cuda": "13.0", "cudnn": 91000, "driver": "580.65",
                        "nccl": "2.27.3", "gpus": [{"index": 0, "name": "NVIDIA H200",
                                                    "capability": "9.0", "memory_mib": 143771,
                                                    "multiprocessors": 132}]},
           "import_failures": {}}
    (out / "env.json").write_text(json.dumps(env))
    (out / "steps.tsv").write_text(
        "env\tpass\t9.0\t\tpython3 tools/gpu_check.py env\n"
        "tests\tFAIL\t50.0\texit 1: FAILED tests/test_cuda.py::test_pinned_memory_loading\tpython3 -m pytest\n"
        "train\tpass\t20.0\t\tpython3 train.py\n"
        "infer\tpass\t12.0\t\tpython3 infer.py\n"
        "infer_crf\tskipped\t0\tpydensecrf is not installed (pip install pydensecrf2)\t\n"
        "evaluate\tpass\t3.0\t\tpython3 evaluate.py\n"
        "train_seg\tpass\t25.0\t\tpython3 train_seg.py\n"
        "infer_seg\tpass\t9.0\t\tpython3 infer_seg.py\n"
        "benchmark\tpass\t140.0\t\tpython3 tools/benchmark.py --device cuda\n"
        "ddp_train\tskipped\t0\tneeds 2 GPUs (1 visible)\t\n")
    run = out / "runs" / "1gpu"
    (run / "cls").mkdir(parents=True)
    (run / "cls" / "metrics.jsonl").write_text(json.dumps(dict(
        iter=20, loss=0.8, images_per_s=250.0, sec_per_iter=0.032, mem_mb=5100.0)) + "\n")
    (run / "cls" / "args.json").write_text(json.dumps(dict(
        network="resnet38_eps", crop_size=96, batch_size=8, max_iters=20)))
    (run / "pseudo" / "run").mkdir(parents=True)
    (run / "pseudo" / "run" / "log.txt").write_text("... rank 0: 48 images in 5.9 s (0.123 s/image)\n")
    (run / "pseudo" / "train_miou.json").write_text(json.dumps({"miou": 0.1234}))
    (run / "deeplab" / "val_run").mkdir(parents=True)
    (run / "deeplab" / "metrics.jsonl").write_text(json.dumps(dict(
        iter=10, loss=4.5, images_per_s=80.0, sec_per_iter=0.1)) + "\n")
    (run / "deeplab" / "args.json").write_text(json.dumps(dict(
        arch="deeplabv2_resnet101", init="none", crop_size=97, batch_size=4, iter_size=2,
        max_iters=10)))
    (run / "deeplab" / "val_run" / "log.txt").write_text("INFO infer_seg: network: 0.050 s per image over 12 images\n")
    (run / "deeplab" / "val_eval.json").write_text(json.dumps({"miou": 0.05}))
    (out / "pytest_cuda.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_configure_numerics" time="0.1"/>'
        '<testcase classname="tests.test_cuda" name="test_pinned_memory_loading" time="2.0">'
        '<failure message="AssertionError: not pinned">trace</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_ddp" time="0.0">'
        '<skipped message="needs 2 GPUs"/></testcase></testsuite></testsuites>')
    (out / "benchmark.json").write_text(json.dumps(bench_record()))
    (out / "benchmark.md").write_text("# Benchmarks\n\nmachine: x\n\n## Training step\n\n| a |\n|---|\n| 1 |\n")
    text, status = gpu_check.render(out, "cuda")
    assert status == 1 and "**1 of 10 steps failed or did not run**: tests" in text
    assert text.startswith("# GPU check on 1 x NVIDIA H200")
    assert "| GPUs | 0: NVIDIA H200 (sm_90, 143771 MiB, 132 SMs) |" in text
    assert "| NVIDIA driver | 580.65 |" in text and "| CUDA / cuDNN / NCCL | 13.0 / 91000 / 2.27.3 |" in text
    assert "| pydensecrf | not installed |" in text
    assert "300 MiB: train.py's default 8 workers need about 512: do NOT fit" in text
    assert "classifier `resnet38_eps` from scratch, crop 96, batch 8, 20 iterations" in text
    assert "| train | pass | 20 | 20 iterations, loss 0.800, 250.0 img/s, 0.032 s/it (last window), peak 5100 MB |" in text
    assert "0.123 s/image" in text and "pseudo-mask mIoU 12.3" in text
    assert "| infer_seg | pass | 9 | 0.050 s/image, val mIoU 5.0 |" in text
    assert "| tests | FAIL | 50 | 1 passed, 1 FAILED, 1 skipped; exit 1: FAILED" in text
    assert "| test_pinned_memory_loading | FAILED | 2 | AssertionError: not pinned |" in text
    assert "| VOC | classifier, train.py (defaults: NCHW fp32) | 20000 | 0.5 | GPU | 2h47m |" in text
    assert "fits one 24 GB GPU: **yes**" in text
    assert "### Training step" in text and "# Benchmarks" not in text
