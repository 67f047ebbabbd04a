"""The synthetic demo dataset: deterministic, in the VOC layout, and with the properties the demo
relies on (context is background and not salient, context always comes with its class)."""
import argparse
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.registry import get_dataset
from tools import make_demo_dataset as demo

SIZE = 64


def _make(root: Path, seed=0, num_train=24, num_val=8, **kw):
    settings = demo.Settings(size=SIZE, **kw)
    return demo.write_dataset(root, num_train, num_val, seed, settings, progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("demo") / "ds", num_train=40, num_val=10)


def _read(root, sub, img_id):
    return np.array(Image.open(Path(root) / sub / f"{img_id}.png"))


def _all_ids(root):
    return [line.strip() for name in ("train.txt", "val.txt")
            for line in open(Path(root) / name) if line.strip()]


def test_same_seed_same_bytes(tmp_path, root):
    again = _make(tmp_path / "again", num_train=40, num_val=10)
    files = sorted(p.relative_to(root) for p in Path(root).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (root / f).read_bytes() == (again / f).read_bytes(), f


def test_seed_and_index_streams():
    a = demo.generate_sample(demo.sample_rng(0, "train", 3), demo.Settings(size=SIZE))
    b = demo.generate_sample(demo.sample_rng(0, "train", 3), demo.Settings(size=SIZE))
    c = demo.generate_sample(demo.sample_rng(1, "train", 3), demo.Settings(size=SIZE))
    for x, y in [(a.image, b.image), (a.gt, b.gt), (a.saliency, b.saliency), (a.context, b.context)]:
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.image, c.image)


def test_more_images_do_not_change_the_first(tmp_path, root):
    small = _make(tmp_path / "small", num_train=5, num_val=2)
    for img_id in ("train_00004", "val_00001"):
        assert (small / "JPEGImages" / f"{img_id}.jpg").read_bytes() == \
            (root / "JPEGImages" / f"{img_id}.jpg").read_bytes()


def test_registry_reads_the_layout(root):
    info = get_dataset("custom", data_root=root)
    assert info.class_names == list(demo.CLASS_NAMES)
    assert info.num_classes == 5
    train, val = info.read_ids("train"), info.read_ids("val")
    assert len(train) == 40 and len(val) == 10 and not set(train) & set(val)
    assert info.read_ids("train_aug") == train
    for img_id in train[:3] + val[:3]:
        assert info.labels_for(img_id).sum() >= 1
        assert info.image_path(root, img_id).is_file()
        assert info.gt_path(root, img_id).is_file()
        assert (root / info.spec.saliency_dir / f"{img_id}.png").is_file()
    # The published style --data_root .../JPEGImages works too.
    assert get_dataset("custom", data_root=root / "JPEGImages").num_classes == 5


def test_file_formats(root):
    img_id = "train_00000"
    im = Image.open(root / "JPEGImages" / f"{img_id}.jpg")
    assert im.mode == "RGB" and im.size == (SIZE, SIZE)
    assert Image.open(root / "SegmentationClassAug" / f"{img_id}.png").mode == "P"
    sal = Image.open(root / "SALImages" / f"{img_id}.png")
    assert sal.mode == "L" and sal.size == (SIZE, SIZE)
    assert Image.open(root / "ContextMasks" / f"{img_id}.png").size == (SIZE, SIZE)
    assert demo.read_context_names(root / "context.txt") == {1: ("railroad", "train"), 2: ("water", "boat")}


def test_image_labels_match_the_masks(root):
    info = get_dataset("custom", data_root=root)
    for img_id in _all_ids(root):
        gt = _read(root, "SegmentationClassAug", img_id)
        in_mask = {int(v) - 1 for v in np.unique(gt) if v not in (0, 255)}
        assert set(np.flatnonzero(info.labels_for(img_id))) == in_mask, img_id
        assert set(np.unique(gt)) <= set(range(6)) | {255}


def test_context_is_background_unsalient_and_cooccurs(root):
    info = get_dataset("custom", data_root=root)
    names = info.class_names
    ctx_sal, obj_sal, seen = [], [], set()
    for img_id in _all_ids(root):
        gt, ctx = _read(root, "SegmentationClassAug", img_id), _read(root, "ContextMasks", img_id)
        sal = _read(root, "SALImages", img_id).astype(np.float64)
        labels = {names[c] for c in np.flatnonzero(info.labels_for(img_id))}
        assert (gt[ctx > 0] == 0).all(), img_id
        for value, (ctx_name, cls) in demo.CONTEXTS.items():
            # Every train is on a railroad and every railroad carries a train (same for boats).
            assert (cls in labels) == bool((ctx == value).any()), (img_id, ctx_name)
            if (ctx == value).any():
                seen.add(ctx_name)
        assert not {"train", "boat"} <= labels
        if (ctx > 0).any():
            ctx_sal.append(sal[ctx > 0].mean())
        obj_sal.append(sal[(gt > 0) & (gt < 255)].mean())
    assert seen == {"railroad", "water"}
    assert np.mean(ctx_sal) < 25 and max(ctx_sal) < 80
    assert np.mean(obj_sal) > 150


def test_saliency_is_imperfect_but_close(root):
    ious = []
    for img_id in _all_ids(root):
        fg = _read(root, "SegmentationClassAug", img_id) > 0
        sal = _read(root, "SALImages", img_id) > 127
        ious.append((fg & sal).sum() / max((fg | sal).sum(), 1))
    assert 0.6 < np.mean(ious) < 0.95  # an off-the-shelf detector, not the ground truth
    assert min(ious) < 0.9


def test_ignore_border_is_optional():
    s = demo.generate_sample(demo.sample_rng(0, "train", 1), demo.Settings(size=SIZE, ignore_border=0))
    t = demo.generate_sample(demo.sample_rng(0, "train", 1), demo.Settings(size=SIZE, ignore_border=1))
    assert 255 not in s.gt and 255 in t.gt
    np.testing.assert_array_equal(s.gt[t.gt != 255], t.gt[t.gt != 255])


def test_refuses_to_overwrite(tmp_path, root):
    with pytest.raises(FileExistsError, match="--overwrite"):
        _make(root)
    parser = argparse.ArgumentParser(parents=[demo.get_args_parser()])
    out = tmp_path / "cli"
    args = parser.parse_args(["--out", str(out), "--num-train", "3", "--num-val", "1", "--size", "48"])
    demo.main(args)
    first = (out / "JPEGImages" / "train_00000.jpg").read_bytes()
    with pytest.raises(demo.DemoDataError, match="--overwrite"):
        demo.main(args)
    demo.main(parser.parse_args(["--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "48",
                                 "--seed", "5", "--overwrite"]))
    assert len((out / "train.txt").read_text().split()) == 2
    assert (out / "JPEGImages" / "train_00000.jpg").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temporary folders left


def test_class_subset(tmp_path):
    parser = argparse.ArgumentParser(parents=[demo.get_args_parser()])
    with pytest.raises(SystemExit):
        parser.parse_args(["--classes", "ball,plane"])
    args = parser.parse_args(["--out", str(tmp_path / "sub"), "--num-train", "6", "--num-val", "0",
                              "--size", "48", "--classes", "star,ball"])
    out = demo.main(args)
    info = get_dataset("custom", data_root=out)
    assert info.class_names == ["star", "ball"]
    assert demo.read_context_names(out / "context.txt") == {}
    assert not any(_read(out, "ContextMasks", i).any() for i in info.read_ids("train"))


def test_generation_is_fast():
    settings = demo.Settings(size=96)
    start = time.process_time()
    for i in range(50):
        demo.generate_sample(demo.sample_rng(0, "train", i), settings)
    # ~2 ms per 96x96 sample on one core; the bound leaves room for a slow, shared CI machine.
    assert time.process_time() - start < 5.0


def test_count_context_errors(root):
    ctx = np.array([[1, 1, 0], [2, 2, 2]], np.uint8)
    pred = np.array([[1, 0, 1], [2, 2, 0]], np.uint8)  # 1 = train, 2 = boat
    got = demo.count_context_errors(pred, ctx, demo.CONTEXTS, list(demo.CLASS_NAMES))
    assert got == {"railroad": (1, 2), "water": (2, 3)}
    # The ground truth itself labels no context pixel as its class; "everything is train" labels all.
    table = demo.read_context_names(root / "context.txt")
    for img_id in _all_ids(root):
        gt, ctx = _read(root, "SegmentationClassAug", img_id), _read(root, "ContextMasks", img_id)
        for wrong, total in demo.count_context_errors(gt, ctx, table, list(demo.CLASS_NAMES)).values():
            assert wrong == 0
        allt = demo.count_context_errors(np.ones_like(gt), ctx, table, list(demo.CLASS_NAMES))
        assert allt["railroad"][0] == allt["railroad"][1] == (ctx == 1).sum()


@pytest.mark.parametrize("size", [32, 128])
def test_every_image_has_a_class(size):
    for i in range(30):
        smp = demo.generate_sample(demo.sample_rng(3, "val", i), demo.Settings(size=size))
        assert smp.labels and smp.image.shape == (size, size, 3)
        assert smp.gt.shape == smp.saliency.shape == smp.context.shape == (size, size)
