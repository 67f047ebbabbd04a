"""Saliency maps whose size differs from their image's (issue 15; data/saliency.py, docs/data.md).

Pins: maps of the image's size give bit for bit the published transform; maps at another
resolution with the image's aspect ratio train exactly as the published formula (each resized from
its own size to one long side); maps with another aspect ratio stop the run before any compute
unless --stretch-saliency; tools/check_dataset.py reports both.
"""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from utils.cli import run_cli
from data import datasets as ds_mod
from data import transforms as tf
from data.datasets import ClsSalDataset, DataError
from data.registry import get_dataset
from data.saliency import (OTHER_ASPECT, RESCALED, SAME, check_saliency_maps, same_aspect_ratio,
                           size_kind)
from test_train import base_argv, run_main

COLORS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))


# ---------------------------------------------------------------------------------------------
# The published formula, written out literally (EPS metadata/dataset.py
# ClassificationDatasetWithSaliency + random_crop_with_saliency): the image and the map are each
# resized FROM THEIR OWN SIZE to one long side L (bicubic, the map converted to RGB first).
# ---------------------------------------------------------------------------------------------
def published_sal_transform(img, sal, crop, resize, rng, jitter=None):
    L = rng.randint(*resize)

    def resize_long(x):
        w, h = x.size
        size = (int(round(w * L / h)), L) if w < h else (L, int(round(h * L / w)))
        return x.resize(size, resample=Image.BICUBIC)

    img, sal = resize_long(img), resize_long(sal.convert("RGB"))
    if rng.random() > 0.5:
        img, sal = img.transpose(Image.FLIP_LEFT_RIGHT), sal.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter is not None:
        img = jitter(img)
    a = np.asarray(img)
    a = ((a / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
         ).astype(np.float32)
    s = np.asarray(sal) / 255.0
    h, w = a.shape[:2]

    def axis(size):
        space = size - crop
        return (0, rng.randrange(space + 1)) if space > 0 else (rng.randrange(-space + 1), 0)

    cont_left, img_left = axis(w)
    cont_top, img_top = axis(h)
    ch, cw = min(crop, h), min(crop, w)
    out = []
    for arr in (a, s):
        c = np.zeros((crop, crop, arr.shape[2]), np.float32)
        c[cont_top:cont_top + ch, cont_left:cont_left + cw] = \
            arr[img_top:img_top + ch, img_left:img_left + cw]
        out.append(c)
    return (torch.from_numpy(np.ascontiguousarray(out[0].transpose(2, 0, 1))),
            torch.from_numpy(np.ascontiguousarray(out[1].transpose(2, 0, 1).mean(0, keepdims=True))))


class PublishedSalTransform(tf.ClsSalTrainTransform):
    """The literal published formula behind the ClsSalTrainTransform interface (``random``
    module, torch-RNG jitter), so a training run can use it as the reference."""

    def __call__(self, img, sal):
        return published_sal_transform(img, sal, self.crop_size,
                                       (self.resize.min_long, self.resize.max_long),
                                       self.rng if self.rng is not None else random,
                                       self.color_jitter)


# ---------------------------------------------------------------------------------------------
# A small generated dataset ('custom' VOC layout) with per-id saliency map sizes
# ---------------------------------------------------------------------------------------------
def make_sal_dataset(root: Path, n: int = 12, seed: int = 0, map_size=None) -> Path:
    """n images of even sizes 32..48 px with coloured squares on noise; SALImages/<id>.png marks
    the squares. ``map_size(i, (w, h)) -> (w', h') or None`` picks the map's size (None = the
    image's); the map is then the full-size map resized bicubic to that size."""
    rng = np.random.RandomState(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SALImages").mkdir()
    lines = []
    for i in range(n):
        w, h = 2 * int(rng.randint(16, 25)), 2 * int(rng.randint(16, 25))
        img = rng.randint(60, 160, (h, w, 3)).astype(np.uint8)
        sal = np.zeros((h, w), np.uint8)
        present = sorted(rng.choice(3, size=1 + i % 2, replace=False).tolist())
        for c in present:
            s = int(rng.randint(10, 16))
            y, x = int(rng.randint(0, h - s)), int(rng.randint(0, w - s))
            img[y:y + s, x:x + s] = COLORS[c]
            sal[y:y + s, x:x + s] = 255
        img_id = f"img_{i:03d}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{img_id}.jpg", quality=95)
        sal_img = Image.fromarray(sal, mode="L")
        size = map_size(i, (w, h)) if map_size else None
        if size is not None:
            sal_img = sal_img.resize(size, Image.BICUBIC)
        sal_img.save(root / "SALImages" / f"{img_id}.png")
        lines.append(img_id + " " + " ".join(map(str, present)))
    (root / "labels.txt").write_text("0 background\n1 red\n2 green\n3 blue\n")
    (root / "image_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("".join(line.split()[0] + "\n" for line in lines))
    return root


def half_every_third(i, size):
    return (size[0] // 2, size[1] // 2) if i % 3 == 0 else None


def other_aspect_two(i, size):
    return (size[0], size[1] // 2) if i in (2, 7) else None


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["loss_cls"], r["loss_sal"], r["loss"]) for r in recs]


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a,b,expected", [
    ((500, 375), (500, 375), True),
    ((500, 375), (250, 188), True),     # half: 187.5 rounded; 1 px off at the image's resolution
    ((500, 374), (125, 94), True),      # quarter: 93.5 -> 94 is 2 px off at the image's, 0.5 at the map's
    ((500, 375), (1000, 750), True),    # a map larger than its image
    ((500, 375), (500, 376), True),     # one pixel
    ((500, 375), (501, 375), True),
    ((500, 375), (500, 377), False),    # two pixels at the same resolution
    ((500, 375), (375, 500), False),    # transposed
    ((500, 375), (300, 300), False),    # a square map
    ((500, 499), (499, 500), False),    # transposed, nearly square: 2 px off
    ((40, 30), (40, 15), False),
])
def test_same_aspect_ratio(a, b, expected):
    assert same_aspect_ratio(a, b) is expected
    assert same_aspect_ratio(b, a) is expected   # symmetric


def test_same_aspect_ratio_accepts_every_rounded_rescale():
    """Any copy made by the published resize-long rule or by rounding both sides of any scale
    (down to 1/8 or up to 4x) passes; a map with a 5% other aspect ratio never does."""
    rng = np.random.RandomState(1)
    for _ in range(3000):
        w, h = int(rng.randint(64, 640)), int(rng.randint(64, 640))
        L = int(rng.randint(8, 2000))
        assert same_aspect_ratio((w, h), tf.resize_long_size((w, h), L)), (w, h, L)
        s = float(rng.uniform(0.125, 4.0))
        scaled = (max(1, round(w * s)), max(1, round(h * s)))
        assert same_aspect_ratio((w, h), scaled), (w, h, s)
        if min(scaled) >= 40:
            assert not same_aspect_ratio((w, h), (scaled[0], round(scaled[1] * 1.05))), (w, h, s)


def test_size_kind():
    assert size_kind((40, 30), (40, 30)) == SAME
    assert size_kind((40, 30), (20, 15)) == RESCALED
    assert size_kind((40, 30), (40, 15)) == OTHER_ASPECT


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_matching_maps_bitwise_unchanged(mode):
    """Maps of the image's size: bit for bit the published formula (which is also the transform
    as it was before maps of other sizes were accepted), with and without colour jitter."""
    r = np.random.RandomState(0)
    for k in range(24):
        w, h = int(r.randint(20, 60)), int(r.randint(20, 60))
        img = Image.fromarray(r.randint(0, 256, (h, w, 3), dtype=np.uint8))
        sal = Image.fromarray(r.randint(0, 256, (h, w), dtype=np.uint8), "L").convert(mode)
        crop = int(r.randint(16, 48))
        jitter = tf.default_color_jitter() if k % 2 else None
        torch.manual_seed(k)
        a = tf.ClsSalTrainTransform(crop, (16, 64), color_jitter=jitter, rng=random.Random(k))(img, sal)
        torch.manual_seed(k)
        b = published_sal_transform(img, sal, crop, (16, 64), random.Random(k), jitter)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (k, mode)


def test_half_resolution_maps_equal_the_published_formula():
    r = np.random.RandomState(2)
    for k in range(24):
        w, h = 2 * int(r.randint(10, 40)), 2 * int(r.randint(10, 40))
        img = Image.fromarray(r.randint(0, 256, (h, w, 3), dtype=np.uint8))
        sal = Image.fromarray(r.randint(0, 256, (h // 2, w // 2), dtype=np.uint8), "L")
        a = tf.ClsSalTrainTransform(32, (16, 96), color_jitter=None, rng=random.Random(k))(img, sal)
        b = published_sal_transform(img, sal, 32, (16, 96), random.Random(k))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), k


class NoFlipTopLeft:
    """``random`` stand-in: L = the lower bound, no flip, every offset 0."""

    def randint(self, a, b):
        return a

    def random(self):
        return 0.0

    def randrange(self, n):
        return 0


def test_stretch_resizes_the_map_to_the_image():
    img = Image.fromarray(np.full((30, 40, 3), 100, np.uint8))
    sal = Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (10, 1)), "L")  # 40x10
    with pytest.raises(DataError, match="another aspect ratio"):
        tf.ClsSalTrainTransform(20, (20, 20), color_jitter=None)(img, sal)
    t = tf.ClsSalTrainTransform(20, (20, 20), color_jitter=None, stretch_saliency=True,
                                rng=NoFlipTopLeft())
    _, out = t(img, sal)
    ref = np.asarray(sal.convert("RGB").resize((20, 15), Image.BICUBIC)) / 255.0
    rows = out[0].numpy()
    filled = rows[np.any(rows != 0, axis=1)]
    assert filled.shape == (15, 20)  # the map covers exactly the image's resized area
    assert np.allclose(filled, ref.mean(axis=2), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------
def test_half_resolution_maps_train_with_the_published_losses(tmp_path, monkeypatch, caplog):
    root = make_sal_dataset(tmp_path / "half", map_size=half_every_third)
    with caplog.at_level(logging.INFO):
        run = run_main(base_argv(root, tmp_path / "runs", session="ours", iters=3))
    assert "saliency maps: 12 checked; 4 at another resolution" in caplog.text
    assert (run / train.FINAL_NAME).is_file()
    # Reference: the same data through the literal published formula.
    monkeypatch.setattr(ds_mod, "ClsSalTrainTransform", PublishedSalTransform)
    ref = run_main(base_argv(root, tmp_path / "runs", session="published", iters=3))
    assert losses(run) == losses(ref)
    assert len(losses(run)) == 3 and all(x[2] > 0 for x in losses(run))


def test_other_aspect_ratio_stops_before_compute_and_trains_when_stretched(tmp_path, caplog):
    root = make_sal_dataset(tmp_path / "aspect", map_size=other_aspect_two)
    argv = base_argv(root, tmp_path / "runs", session="refused", iters=2)
    with pytest.raises(DataError) as e:
        run_main(argv)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("2 of 12 saliency maps have another aspect ratio than their image")
    assert "img_002 (map" in msg and "img_007 (map" in msg and "--stretch-saliency" in msg
    assert "regenerate" in msg and "misalign" in msg
    assert not list((tmp_path / "runs").rglob("*.pth"))
    assert run_cli(train.get_args_parser, train.main, argv=argv) == 2  # one line, status 2
    assert not (tmp_path / "runs" / "refused").exists()  # refused before the run directory
    # Without the pre-check, the dataset itself refuses the first such map, naming the file.
    with pytest.raises(DataError, match=r"img_00[27]\.png is \d+x\d+ \(WxH\).*another aspect ratio"):
        run_main(base_argv(root, tmp_path / "runs", session="unchecked", iters=12,
                           no_check_data=True))
    assert not list((tmp_path / "runs").rglob("*.pth"))
    with caplog.at_level(logging.INFO):
        run = run_main(base_argv(root, tmp_path / "runs", session="stretched", iters=2,
                                 stretch_saliency=True))
    assert (run / train.FINAL_NAME).is_file()
    assert "2 with another aspect ratio stretched to their image (--stretch-saliency" in caplog.text
    assert json.loads((run / "args.json").read_text())["stretch_saliency"] is True


def test_check_saliency_maps_report(tmp_path):
    root = make_sal_dataset(tmp_path / "d", n=6, map_size=lambda i, s: (
        (s[0] // 2, s[1] // 2) if i == 1 else (s[0], s[1] // 2) if i == 4 else None))
    info = get_dataset("custom", data_root=root)
    ds = ClsSalDataset(info, root, None, "train", crop_size=16)
    with pytest.raises(DataError, match=r"^1 of 6 saliency maps .*img_004 \(map"):
        check_saliency_maps(ds, stretch=False)
    rep = check_saliency_maps(ds, stretch=True)
    assert rep.num_maps == 6 and len(rep.rescaled) == 1 and rep.rescaled[0].startswith("img_001 (map")
    assert len(rep.other_aspect) == 1 and rep.other_aspect[0].startswith("img_004")
    assert rep.error() is None and "1 at another resolution" in rep.summary()


# ---------------------------------------------------------------------------------------------
# tools/check_dataset.py
# ---------------------------------------------------------------------------------------------
def _check(root, *extra):
    from tools import check_dataset
    argv = ["--dataset", "custom", "--data-root", str(root), "--saliency-root",
            str(root / "SALImages"), "--list", "train", "--workers", "1", *extra]
    return check_dataset.main(check_dataset.get_args_parser().parse_args(argv))


def test_check_dataset_warns_about_other_resolutions(tmp_path, capsys):
    root = make_sal_dataset(tmp_path / "half", map_size=half_every_third)
    report = _check(root)
    out = capsys.readouterr().out
    assert report.passed and report.ok["saliency"] == 12
    line = next(x for x in out.splitlines() if x.startswith("WARNING: saliency: 4 maps at another resolution"))
    assert "(first: img_000 (" in line and "img_003 (" in line and ", ..." in line
    assert "OK: all 12 ids passed (with the warnings above)" in out


def test_check_dataset_other_aspect_ratio(tmp_path, capsys):
    root = make_sal_dataset(tmp_path / "aspect", map_size=other_aspect_two)
    report = _check(root)
    out = capsys.readouterr().out
    assert not report.passed
    assert len(report.problems[("saliency", "aspect ratio differs from image")]) == 2
    assert "img_002.png (" in out and "PROBLEMS: 2 of 12 ids" in out
    assert "or stretch them to the image with --stretch-saliency" in out
    report = _check(root, "--stretch-saliency")
    out = capsys.readouterr().out
    assert report.passed
    assert "WARNING: saliency: 2 maps with another aspect ratio than their image: stretched" in out
