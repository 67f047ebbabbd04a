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


# --------------------------------------------------------------------------------------------
# the overview of infer.py --vis-dir
# --------------------------------------------------------------------------------------------
from utils import vis  # noqa: E402
from utils.io import voc_palette  # noqa: E402

NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus"]


def find(haystack: np.ndarray, needle: np.ndarray):
    """(y, x) of every place where ``needle`` appears unchanged in ``haystack``."""
    h, w = needle.shape[:2]
    ys, xs = np.nonzero(np.all(haystack[:haystack.shape[0] - h + 1, :haystack.shape[1] - w + 1]
                               == needle[0, 0], axis=-1))
    return [(y, x) for y, x in zip(ys, xs) if np.array_equal(haystack[y:y + h, x:x + w], needle)]


def has_block(img: np.ndarray, rgb, size: int = 6) -> bool:
    """Whether a size x size block of exactly ``rgb`` appears (a legend swatch)."""
    hit = np.all(img == np.asarray(rgb, np.uint8), axis=-1).astype(np.int32)
    win = np.lib.stride_tricks.sliding_window_view(hit, (size, size))
    return bool((win.sum(axis=(-1, -2)) == size * size).any())


def tiny_case(n_classes: int, with_bg: bool, h: int = 12, w: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    keys = list(range(n_classes))
    cams = rng.random((n_classes, h, w)).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for k in keys:   # one stripe of rows per class
        mask[k * 2:k * 2 + 2] = k + 1
    return image, mask, keys, cams, (rng.random((h, w)).astype(np.float32) if with_bg else None)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 9, 13])
def test_row_lengths_are_balanced_and_never_leave_a_blank_cell(n):
    rows = vis.row_lengths(n, 6)
    assert sum(rows) == n and max(rows) <= 6 and max(rows) - min(rows) <= 1
    if n <= 6:
        assert rows == [n]                   # one row when it fits
    assert vis.row_lengths(5, 4) == [3, 2] and vis.row_lengths(7, 4) == [4, 3]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_tile_rows_fills_one_row_with_every_tile(n):
    tiles = [np.full((10, 8, 3), 10 * (i + 1), np.uint8) for i in range(n)]
    out = vis.tile_rows(tiles, max_columns=6, pad=4)
    assert out.shape == (10, n * 12 - 4, 3)          # exactly n tiles wide: no blank cell
    for i in range(n):
        assert np.all(out[:, i * 12:i * 12 + 8] == 10 * (i + 1))


@pytest.mark.parametrize("n_panels", [2, 3, 4, 5, 6])
def test_overview_has_no_blank_tiles(n_panels):
    # image + mask (+ EPS background) + one CAM per class
    with_bg = n_panels % 2 == 1
    case = tiny_case(n_panels - 2 - with_bg, with_bg)
    out = vis.cam_overview(*case[:4], NAMES, bg=case[4], min_side=96)
    tile_w = vis.display_size(12, 16, min_side=96)[1]
    assert out.shape[1] == 2 * vis.MARGIN + n_panels * (tile_w + 4) - 4   # one full row


def test_overview_balances_rows_when_capped():
    case = tiny_case(4, True)                      # 7 panels, at most 4 a row -> 4 + 3
    out = vis.cam_overview(*case[:4], NAMES, bg=case[4], columns=4, min_side=96)
    tile_w = vis.display_size(12, 16, min_side=96)[1]
    assert out.shape[1] == 2 * vis.MARGIN + 4 * (tile_w + 4) - 4


def test_overview_captions_leave_the_image_untouched():
    image, mask, keys, cams, bg = tiny_case(2, True)
    out = vis.cam_overview(image, mask, keys, cams, NAMES, bg=bg, title="img_a", min_side=96)
    k = vis.display_size(12, 16, min_side=96)[0] // 12
    assert k == 6                                  # small images are enlarged by an integer
    big = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    assert len(find(out, big)) == 1                # every pixel of the image tile is intact


def test_display_size():
    assert vis.display_size(96, 96) == (192, 192)          # the demo: 2x
    assert vis.display_size(375, 500) == (240, 320)        # VOC: shrunk
    assert vis.display_size(250, 200) == (250, 200)        # in range: as is


def test_captioned_puts_the_text_beside_the_tile():
    t = np.full((20, 30, 3), 7, np.uint8)
    out = vis.captioned(t, "a long caption that does not fit")
    assert out.shape[1] == 30 and out.shape[0] > 20
    assert np.array_equal(out[-20:], t)
    assert np.array_equal(vis.captioned(t, "x", below=True)[:20], t)


def test_legend_entries_name_the_classes_present():
    mask = np.array([[0, 3, 6], [255, 3, 0]], np.uint8)
    pal = voc_palette()
    assert vis.legend_entries(mask, NAMES) == [
        ("bird", tuple(pal[3])), ("bus", tuple(pal[6])), ("background (untinted)", None),
        ("ignore (255)", tuple(pal[255]))]
    assert vis.legend_entries([0], NAMES) == [("background (untinted)", None)]
    assert vis.label_name(9, NAMES) == "class 9"   # a value past the name list is still named


def test_overview_legend_shows_the_colours_of_the_present_classes():
    image, mask, keys, cams, bg = tiny_case(3, True)
    out = vis.cam_overview(image, mask, keys, cams, NAMES, bg=bg, min_side=96)
    pal = voc_palette()
    for v in (1, 2, 3):
        assert has_block(out, pal[v])
    assert not has_block(out, pal[5])              # bottle is not in the mask


def test_legend_wraps_within_its_width():
    entries = vis.legend_entries(np.arange(7), NAMES)
    band = vis.legend(200, entries, title="pseudo-mask:", colour_bar=vis.heat_note(True))
    assert band.shape[1] == 200 and band.shape[0] > 3 * vis.line_height(vis.font())


def test_save_cam_overview_writes_rgb_png(tmp_path):
    image, mask, keys, cams, bg = tiny_case(1, False)
    vis.save_cam_overview(tmp_path / "a.png", image, mask, keys, cams, NAMES, bg=bg, title="a")
    assert Image.open(tmp_path / "a.png").mode == "RGB"


# --------------------------------------------------------------------------------------------
# the demo comparison figure
# --------------------------------------------------------------------------------------------
def test_comparison_figure_has_a_legend(tmp_path):
    from data.registry import get_dataset
    from tools.demo_report import comparison_figure
    from tools.make_demo_dataset import Settings, write_dataset
    root = write_dataset(tmp_path / "data", 8, 1, seed=0, settings=Settings(size=32),
                         progress=False)
    info = get_dataset("custom", None, root)
    ids = info.read_ids("train")
    fig = comparison_figure(root, ids, info, {"GT again": root / "SegmentationClassAug"}, 2,
                            [1, 2], context_names={1: "railroad", 2: "water"})
    assert fig is not None and fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    from tools.demo_report import choose_figure_ids
    rows = choose_figure_ids(root, ids, 2, [1, 2])
    assert [ctx for _, ctx in rows] and all(ctx for _, ctx in rows)   # rows hold context pixels
    shown = np.unique(np.concatenate([np.asarray(Image.open(info.gt_path(root, i))).ravel()
                                      for i, _ in rows]))
    pal = voc_palette()
    for v in shown:      # every class of the shown rows has a swatch, and so has 255
        if v != 0:
            assert has_block(fig, pal[v]), v
    assert 255 in shown
