"""The pictures: loss curves (utils/plots.py), the CAM overview of infer.py --vis-dir
(utils/vis.py) and the demo comparison figure (tools/demo_report.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from utils import plots


# --------------------------------------------------------------------------------------------
# loss curves
# --------------------------------------------------------------------------------------------
def recs(**series):
    """Records with iter 1..n and the given per-key value lists."""
    n = len(next(iter(series.values())))
    return [dict(iter=i + 1, lr=0.01, **{k: v[i] for k, v in series.items()}) for i in range(n)]


def test_series_eps_draws_total_and_both_terms():
    r = recs(loss_cls=[0.7, 0.3], loss_sal=[0.2, 0.1], loss=[0.9, 0.4])
    assert plots.series_to_plot(r) == [("loss", "loss (total)"), ("loss_cls", "loss_cls"),
                                       ("loss_sal", "loss_sal")]


def test_series_baseline_is_one_curve():
    r = recs(loss_cls=[0.7, 0.3], loss=[0.7, 0.3])
    assert plots.series_to_plot(r) == [("loss", "loss (= loss_cls)")]


def test_series_old_baseline_file_drops_the_zero_sal_term():
    r = recs(loss_cls=[0.7, 0.3], loss_sal=[0.0, 0.0], loss=[0.7, 0.3])
    assert plots.series_to_plot(r) == [("loss", "loss (= loss_cls)")]


def test_series_single_term_that_differs_from_the_total_is_drawn():
    r = recs(loss_cls=[0.7, 0.3], loss=[0.35, 0.15])   # e.g. a weighted loss
    assert plots.series_to_plot(r) == [("loss", "loss (total)"), ("loss_cls", "loss_cls")]


def test_series_never_draws_a_zero_series():
    r = recs(loss_cls=[0.0, 0.0], loss_sal=[0.0, 0.0], loss=[0.0, 0.0])
    assert plots.series_to_plot(r) == []
    assert plots.series_to_plot(recs(loss=[0.5, 0.2])) == [("loss", "loss")]


def test_series_nan_is_not_zero():
    # a diverged term must show, not be dropped as "zero everywhere"
    r = recs(loss_cls=[0.7, 0.3], loss_sal=[0.1, math.nan], loss=[0.8, math.nan])
    assert [k for k, _ in plots.series_to_plot(r)] == ["loss", "loss_cls", "loss_sal"]


def test_log_scale_only_for_a_positive_range_over_a_decade():
    assert plots.use_log_scale([0.7, 0.02])
    assert not plots.use_log_scale([0.7, 0.2])
    assert not plots.use_log_scale([0.7, 0.0])
    assert not plots.use_log_scale([])


@pytest.mark.parametrize("eps", [True, False])
def test_plot_losses_writes_a_png(tmp_path, eps):
    path = tmp_path / "metrics.jsonl"
    lines = []
    for it in (1, 10, 20, 30):
        cls = 0.7 / it
        rec = dict(iter=it, loss_cls=cls, loss_sal=0.1 if eps else 0.0,
                   loss=cls + (0.1 if eps else 0.0), lr=0.01, mem_mb=3.0)
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n\n")   # a trailing blank line is tolerated
    out = tmp_path / "sub" / "loss.png"
    plots.plot_losses(path, out, title="voc12_eps (resnet38_eps)")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 300
    assert not list(out.parent.glob(".*"))          # atomic: no temporary file left behind


def test_plot_losses_without_records_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    plots.plot_losses(path, tmp_path / "loss.png", title="run")
    assert not (tmp_path / "loss.png").exists()
