"""Datasets on a tiny generated VOC-layout folder (a 'custom' dataset root with its own metadata)."""
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import transforms as tf
from data.datasets import (ClsDataset, ClsSalDataset, DataError, InferDataset, SegDataset)
from data.registry import get_dataset

SIZES = {"img_a": (20, 16), "img_b": (12, 24), "img_c": (16, 16)}  # (w, h)


def _rgb(w, h, seed):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "VOCmini"
    for sub in ("JPEGImages", "SALImages", "SegmentationClassAug"):
        (r / sub).mkdir(parents=True)
    for i, (img_id, (w, h)) in enumerate(SIZES.items()):
        Image.fromarray(_rgb(w, h, i)).save(r / "JPEGImages" / f"{img_id}.jpg", quality=95)
        sal = np.zeros((h, w), np.uint8)
        sal[: h // 2] = 255
        Image.fromarray(sal, mode="L").save(r / "SALImages" / f"{img_id}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2:] = 1
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(r / "SegmentationClassAug" / f"{img_id}.png")
    (r / "labels.txt").write_text("0 background\n1 cat\n2 dog\n")
    (r / "image_labels.txt").write_text("# test labels\nimg_a 0\nimg_b 1\nimg_c 0 1\nimg_empty\n")
    (r / "train.txt").write_text("img_a\nimg_b\nimg_c\n")
    return r


@pytest.fixture
def info(root):
    return get_dataset("custom", data_root=root)


def test_cls_dataset_items_and_repr(root, info):
    ds = ClsDataset(info, root, "train", crop_size=8, resize_size=(10, 12))
    assert len(ds) == 3
    img_id, img, label = ds[2]
    assert img_id == "img_c" and img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert label.tolist() == [1.0, 1.0] and label.dtype == torch.float32
    assert "size=3" in repr(ds) and str(root) in repr(ds)
    # the published --data_root points at JPEGImages; both forms work
    ds2 = ClsDataset(info, root / "JPEGImages", ["img_b"], crop_size=8)
    assert ds2[0][2].tolist() == [0.0, 1.0]
    pickle.dumps(ds)  # DataLoader workers started with 'spawn' need this


def test_cls_sal_dataset_items(root, info):
    ds = ClsSalDataset(info, root, None, ["img_a", "img_b"], crop_size=32, resize_size=(24, 24))
    assert ds.saliency_root == root / "SALImages"
    img_id, img, sal, label = ds[1]
    assert img.shape == (3, 32, 32) and sal.shape == (1, 32, 32) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0.0 and float(sal.max()) <= 1.0 and float(sal.max()) > 0.9
    assert label.tolist() == [0.0, 1.0]
    assert str(root / "SALImages") in repr(ds)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch[1].shape == (2, 3, 32, 32) and batch[2].shape == (2, 1, 32, 32)


def test_cls_sal_dataset_pinned_geometry(root, info):
    """With pinned random draws the saliency lands exactly where the (flipped) image lands."""
    class Rng:
        def randint(self, a, b): return 16           # img_c is 16x16: no resize
        def random(self): return 0.9                  # flip
        def randrange(self, n): return n - 1          # pad: image at the far corner

    ds = ClsSalDataset(info, root, root / "SALImages", ["img_c"], crop_size=20, resize_size=(16, 16),
                       transform=tf.ClsSalTrainTransform(20, (16, 16), color_jitter=None, rng=Rng()))
    _, img, sal, _ = ds[0]
    assert torch.all(sal[0, 4:12, 4:] == 1) and torch.all(sal[0, 12:, 4:] == 0)
    assert torch.all(sal[0, :4] == 0) and torch.all(sal[0, :, :4] == 0)
    assert torch.all(img[:, :4] == 0) and torch.all(img[:, :, :4] == 0)


def test_infer_dataset(root, info):
    ds = InferDataset(info, root, ["img_a"], return_image=True)
    item = ds[0]
    assert item["id"] == "img_a" and item["size"] == (16, 20)
    assert [tuple(t.shape) for t in item["images"]] == [(3, 8, 10), (3, 16, 20), (3, 24, 30), (3, 32, 40)]
    img = Image.open(root / "JPEGImages" / "img_a.jpg").convert("RGB")
    assert np.array_equal(item["images"][1].numpy(), tf.normalize(img).transpose(2, 0, 1))  # not flipped
    assert item["label"].tolist() == [1.0, 0.0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (16, 20, 3)
    assert "scales=(0.5, 1.0, 1.5, 2.0)" in repr(ds)


def test_seg_dataset(root, info, tmp_path):
    calls = []

    def hook(image, mask):
        calls.append(1)
        return image[:, ::-1], mask[:, ::-1]
    ds = SegDataset(info, root, ["img_a"], transform=hook)
    img_id, image, mask = ds[0]
    assert image.dtype == np.uint8 and image.shape == (16, 20, 3)
    assert mask.dtype == np.uint8 and mask[0, -1] == 255 and mask[-1, 0] == 1 and calls == [1]
    other = tmp_path / "pred"
    other.mkdir()
    Image.fromarray(np.full((24, 12), 2, np.uint8)).save(other / "img_b.png")
    _, _, m = SegDataset(info, root, ["img_b"], mask_dir=other)[0]
    assert np.all(m == 2)


# ---------------------------------------------------------------- errors
def test_missing_image_stops_by_default_and_skip_missing_counts(root, info, caplog):
    (root / "JPEGImages" / "img_b.jpg").unlink()
    with pytest.raises(DataError, match=r"img_b\.jpg.*--skip-missing"):
        ClsDataset(info, root, "train", crop_size=8)
    with caplog.at_level(logging.WARNING):
        ds = ClsDataset(info, root, "train", crop_size=8, skip_missing=True)
    assert ds.ids == ["img_a", "img_c"] and ds.num_skipped == 1 and "skipped=1" in repr(ds)
    assert "skipped 1 of 3" in caplog.text


def test_missing_saliency(root, info):
    (root / "SALImages" / "img_c.png").unlink()
    with pytest.raises(DataError, match=r"saliency .*img_c\.png"):
        ClsSalDataset(info, root, None, "train", crop_size=8)
    assert len(ClsSalDataset(info, root, None, "train", crop_size=8, skip_missing=True)) == 2


def test_saliency_size_mismatch(root, info):
    # Another aspect ratio (20x8 for a 20x16 image): refused, naming the file, unless stretched.
    Image.new("L", (20, 8)).save(root / "SALImages" / "img_a.png")
    ds = ClsSalDataset(info, root, None, ["img_a"], crop_size=8)
    with pytest.raises(DataError, match=r"img_a\.png is 20x8 .* 20x16: another aspect ratio.*"
                                        r"regenerate.*--stretch-saliency"):
        ds[0]
    ds = ClsSalDataset(info, root, None, ["img_a"], crop_size=8, stretch_saliency=True)
    assert ds[0][2].shape == (1, 8, 8) and "stretch_saliency=True" in repr(ds)
    # Half resolution (same aspect ratio): accepted without the flag.
    Image.new("L", (10, 8)).save(root / "SALImages" / "img_a.png")
    assert ClsSalDataset(info, root, None, ["img_a"], crop_size=8)[0][2].shape == (1, 8, 8)


def test_id_without_labels_and_image_without_class(root, info):
    Image.fromarray(_rgb(8, 8, 9)).save(root / "JPEGImages" / "img_nolabel.jpg")
    Image.fromarray(_rgb(8, 8, 9)).save(root / "JPEGImages" / "img_empty.jpg")
    with pytest.raises(DataError, match=r"image_labels\.txt.*no image labels for id 'img_nolabel'"):
        ClsDataset(info, root, ["img_a", "img_nolabel"], crop_size=8)
    with pytest.raises(DataError, match=r"'img_empty' has no class"):
        InferDataset(info, root, ["img_empty"])
    # segmentation does not need image labels
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClassAug" / "img_empty.png")
    assert len(SegDataset(info, root, ["img_empty"])) == 1


def test_corrupt_and_truncated_image(root, info):
    (root / "JPEGImages" / "img_a.jpg").write_bytes(b"not a jpeg at all")
    data = (root / "JPEGImages" / "img_b.jpg").read_bytes()
    (root / "JPEGImages" / "img_b.jpg").write_bytes(data[: len(data) // 2])
    ds = ClsDataset(info, root, "train", crop_size=8)
    with pytest.raises(DataError, match=r"cannot read image .*img_a\.jpg"):
        ds[0]
    with pytest.raises(DataError, match=r"cannot read image .*img_b\.jpg"):
        ds[1]


def test_bad_masks(root, info):
    Image.new("RGB", (20, 16)).save(root / "SegmentationClassAug" / "img_a.png")
    Image.new("L", (3, 3)).save(root / "SegmentationClassAug" / "img_b.png")
    (root / "SegmentationClassAug" / "img_c.png").unlink()
    with pytest.raises(DataError, match=r"mask .*img_c\.png"):
        SegDataset(info, root, "train")
    ds = SegDataset(info, root, ["img_a", "img_b"])
    with pytest.raises(DataError, match="mode RGB"):
        ds[0]
    with pytest.raises(DataError, match=r"img_b\.png is 3x3"):
        ds[1]


def test_empty_list_and_bad_resize(root, info):
    with pytest.raises(DataError):
        ClsDataset(info, root, [], crop_size=8)
    with pytest.raises(ValueError, match="two values"):
        ClsDataset(info, root, ["img_a"], crop_size=8, resize_size=(10,))


def test_default_rng_is_python_random(root, info):
    ds = ClsSalDataset(info, root, None, ["img_a"], crop_size=8, resize_size=(10, 30))
    random.seed(5)
    torch.manual_seed(5)
    a = ds[0]
    random.seed(5)
    torch.manual_seed(5)
    b = ds[0]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


# ---------------------------------------------------------------- tools/check_dataset.py
def _check(argv):
    from tools import check_dataset
    return check_dataset.main(check_dataset.get_args_parser().parse_args([str(a) for a in argv]))


def test_check_dataset_clean(root, capsys):
    report = _check(["--dataset", "custom", "--data-root", root, "--saliency-root", root / "SALImages",
                     "--list", "train", "--gt", "--workers", "2"])
    assert report.passed and report.ok["image"] == 3 and report.ok["saliency"] == 3
    out = capsys.readouterr().out
    assert "| image | 3 | - | 0 | |" in out and "OK: all 3 ids passed" in out


def test_check_dataset_reports_every_problem(root, capsys):
    (root / "train.txt").write_text("img_a\nimg_b\nimg_c\nimg_empty\nimg_x\nimg_a\n")
    (root / "JPEGImages" / "img_b.jpg").write_bytes(b"garbage")
    Image.new("L", (20, 4)).save(root / "SALImages" / "img_a.png")  # another aspect ratio
    (root / "SALImages" / "img_c.png").unlink()
    (root / "SegmentationClassAug" / "img_c.png").unlink()
    report = _check(["--dataset", "custom", "--data-root", root / "JPEGImages",
                     "--saliency-root", root / "SALImages", "--list", "train", "--gt", "--workers", "1"])
    p = {k: len(v) for k, v in report.problems.items()}
    assert p[("list", "duplicate id")] == 1
    assert p[("image", "missing")] == 2          # img_empty, img_x
    assert p[("image", "unreadable")] == 1       # img_b
    assert p[("saliency", "aspect ratio differs from image")] == 2  # img_a listed twice
    assert p[("saliency", "missing")] == 3       # img_c, img_empty, img_x
    assert p[("labels", "image with no class")] == 1
    assert [k for k in p if k[0] == "labels" and k[1].startswith("no labels")] and report.ok["labels"] == 4
    assert p[("gt", "missing")] == 3          # GT beside JPEGImages even with a JPEGImages root
    assert not report.passed
    out = capsys.readouterr().out
    assert "img_a.png (20x4 vs 20x16)" in out and "PROBLEMS: 5 of 6 ids" in out


def test_check_dataset_cli_exit_status(root):
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parents[1] / "tools" / "check_dataset.py"
    ok = subprocess.run([sys.executable, str(tool), "--dataset", "custom", "--data-root", str(root),
                         "--list", "train"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (root / "JPEGImages" / "img_a.jpg").unlink()
    bad = subprocess.run([sys.executable, str(tool), "--dataset", "custom", "--data-root", str(root),
                          "--list", "train"], capture_output=True, text=True)
    assert bad.returncode == 1 and "missing" in bad.stdout
