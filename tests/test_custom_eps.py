"""script/custom_eps.sh: the whole method from a folder of images, a class list and image labels
(the demo generator's output without its saliency maps), with a tiny random-weight ONNX model
standing in for rembg's U^2-Net download."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.onnx_models import saliency_onnx
from tests.test_scripts import SCRIPT, SCRIPT_VARS, TINY, is_number, ok, result_rows

pytest.importorskip("rembg")

REPO = Path(__file__).resolve().parents[1]
MORE_VARS = "SAL_MODEL SAL_MODEL_PATH SAL_DEVICE SAL_ARGS SEG_EVALUATE PIPELINE_STAGES".split()
N_TRAIN, N_VAL = 8, 3


def run_custom(timeout: int = 300, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS + MORE_VARS}
    full.update(TINY)
    full.update(NETWORK="small_eps", SAL_ARGS="--workers 1 --threads 1 --no-progress")
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPT / "custom_eps.sh")], env=full, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("custom")
    demo = tmp / "demo"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_dataset.py"), "--out", str(demo),
                    "--num-train", str(N_TRAIN), "--num-val", str(N_VAL), "--size", "40"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(demo=demo, model=saliency_onnx(tmp / "models" / "tiny.onnx"))


def custom_root(source, dest: Path, gt: bool = True) -> Path:
    """The user's layout: images, labels.txt, image_labels.txt, train.txt, val.txt; no maps."""
    dest.mkdir(parents=True)
    shutil.copytree(source["demo"] / "JPEGImages", dest / "JPEGImages")
    if gt:
        shutil.copytree(source["demo"] / "SegmentationClassAug", dest / "SegmentationClassAug")
    for name in ("labels.txt", "image_labels.txt", "train.txt", "val.txt"):
        shutil.copy(source["demo"] / name, dest / name)
    return dest


@pytest.mark.slow
def test_check_only_plans_the_saliency_maps(source, tmp_path):
    root = custom_root(source, tmp_path / "data", gt=False)
    out = ok(run_custom(DATASET_ROOT=root, SAVE_ROOT=tmp_path / "runs", CHECK_ONLY=1,
                        SAL_MODEL_PATH=source["model"], timeout=120))
    assert f"saliency maps of train ({N_TRAIN} ids, {N_TRAIN} to make) with --model-path" in out
    assert f"small_eps on custom train ({N_TRAIN} ids)" in out
    assert "skip eval: no ground truth" in out and "predictions on val are written, not scored" in out
    assert "nothing was run" in out
    assert not (root / "SALImages").exists() and not (tmp_path / "runs").exists()


def test_check_only_without_rembg_says_what_to_install(source, tmp_path):
    root = custom_root(source, tmp_path / "data")
    fake = tmp_path / "fake"
    (fake / "rembg").mkdir(parents=True)
    (fake / "rembg" / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    proc = run_custom(DATASET_ROOT=root, SAVE_ROOT=tmp_path / "runs", CHECK_ONLY=1,
                      PYTHONPATH=fake, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "saliency: " in proc.stderr and "pip install -r requirements-saliency.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and not (root / "SALImages").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_custom_eps_end_to_end_then_rerun_skips(source, tmp_path):
    root = custom_root(source, tmp_path / "data")
    env = dict(DATASET_ROOT=root, SAVE_ROOT=tmp_path / "runs", SAL_MODEL_PATH=source["model"])
    out = ok(run_custom(**env))
    run = tmp_path / "runs" / "custom_eps"
    sal = root / "SALImages"
    assert len(list(sal.glob("*.png"))) == N_TRAIN
    record = json.loads((sal / "saliency_model.json").read_text())
    assert record["weights_file"] == str(source["model"]) and record["postprocess"] == "raw"
    assert (run / "checkpoint_cls.pth").is_file()
    assert len(list((run / "result" / "png").glob("*.png"))) == N_TRAIN
    assert len(list((run / "deeplab" / "val").glob("*.png"))) == N_VAL
    rows = result_rows(out)
    pseudo = rows["pseudo-masks (thr 0.20, no CRF)"]
    assert pseudo[:2] == ("train", "n/a") and is_number(pseudo[2])
    assert rows["DeepLab-v2"][:2] == ("val", "n/a") and is_number(rows["DeepLab-v2"][2])

    stamps = {p: p.stat().st_mtime_ns for p in list(run.rglob("*.p*")) + list(sal.glob("*.png"))}
    # rerun: every stage is skipped, and what only the skipped stages need may be gone
    out2 = ok(run_custom(**{**env, "SAL_MODEL_PATH": "/nonexistent/u2net.onnx",
                            "WEIGHTS": "/nonexistent/w", "SEG_INIT": "/nonexistent/d.pth"}))
    for stage in ("saliency", "train", "eval", "seg", "segeval"):
        assert f"skip {stage}:" in out2, stage
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result_rows(out2) == rows
