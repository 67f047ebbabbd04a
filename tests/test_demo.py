"""script/demo.sh end to end with tiny settings, and the table of tools/demo_report.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools.demo_report import ReportError, format_report, parse_named

REPO = Path(__file__).resolve().parents[1]

DEMO_VARS = ("DEMO_DATA NUM_TRAIN NUM_VAL SIZE DATA_SEED OUT MAX_ITERS BATCH CROP RESIZE LR TAU "
             "LAM SEED THR VIS_NUM SEG_ITERS SEG_BATCH SEG_CROP SEG_LR DEVICE JOBS THREADS STAGES "
             "PYTHON TICK").split()


def test_parse_named():
    assert parse_named("CAM baseline=runs/a/png") == ("CAM baseline", Path("runs/a/png"))
    with pytest.raises(ReportError):
        parse_named("runs/a/png")


def test_format_report_delta_and_percent_rows():
    rows = [("mIoU", [0.2, 0.45]), ("rail labelled train", [0.9, 0.1]),
            ("seg", [float("nan"), 0.3])]
    text = format_report(["base", "EPS"], rows, pct_rows=["rail labelled train"])
    lines = text.splitlines()
    assert lines[0] == "|  | base | EPS | EPS - base |"
    assert lines[2] == "| mIoU | 20.0 | 45.0 | +25.0 |"
    assert lines[3] == "| rail labelled train | 90.0% | 10.0% | -80.0 |"
    assert lines[4] == "| seg | - | 30.0 |  |"   # no delta without both numbers


@pytest.mark.slow
def test_demo_script_tiny(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DEMO_VARS}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               DEMO_DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"), NUM_TRAIN="12",
               NUM_VAL="4", SIZE="48", MAX_ITERS="2", BATCH="4", CROP="32", RESIZE="32 48",
               VIS_NUM="2", SEG_ITERS="2", SEG_BATCH="2", SEG_CROP="32", TICK="1")
    run = lambda **extra: subprocess.run(["bash", str(REPO / "script" / "demo.sh")],  # noqa: E731
                                         env={**env, **extra}, capture_output=True, text=True,
                                         timeout=240, cwd=REPO)
    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert (tmp_path / "data" / "dataset_info.json").is_file()
    for name in ("baseline", "eps"):
        assert len(list((out / name / "result" / "png").glob("*.png"))) == 12
        assert (out / name / "result" / "train_miou.json").is_file()
        assert len(list((out / name / "result" / "vis").glob("*.png"))) == 2
    assert (out / "eps" / "deeplab" / "val_eval.txt").is_file()
    assert not (out / "baseline" / "deeplab").exists()
    report = (out / "report.md").read_text()
    assert report in proc.stdout
    # The terminal shows each chain's latest progress line (TICK=1 here, 15 s by default), and
    # the log files hold plain lines, not carriage-return progress bars.
    assert re.search(r"\] (baseline|eps) \| .*ETA", proc.stdout), proc.stdout
    for name in ("baseline", "eps"):
        assert "\r" not in (out / f"{name}.log").read_text()
    for row in ("pseudo-mask mIoU (train, 12 images)", "IoU background", "IoU train",
                "railroad pixels labelled train", "water pixels labelled boat",
                "segmentation net on the pseudo-masks: mIoU (val)"):
        assert f"| {row} |" in report
    assert report.splitlines()[0] == "|  | CAM baseline | EPS | EPS - CAM baseline |"

    # Rerun, one chain after the other: everything finished is skipped and the table is the same.
    stamp = (out / "eps" / "checkpoint_cls.pth").stat().st_mtime_ns
    proc2 = run(JOBS="1")
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    for what in ("data", "baseline train", "eps train", "baseline eval", "eps eval", "eps seg"):
        assert f"skip {what}:" in proc2.stdout
    assert (out / "eps" / "checkpoint_cls.pth").stat().st_mtime_ns == stamp
    assert (out / "report.md").read_text() == report

    # A failing stage stops the demo with a pointer to the log that holds the reason.
    proc3 = run(OUT=str(tmp_path / "empty"), STAGES="infer")
    assert proc3.returncode == 2 and "a stage failed" in proc3.stderr
    assert "add 'train' to STAGES" in (tmp_path / "empty" / "eps.log").read_text()
    if (out / "compare.png").exists():  # only when the 12 images hold a train or a boat
        from PIL import Image
        assert np.asarray(Image.open(out / "compare.png")).ndim == 3
