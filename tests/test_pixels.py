"""Saliency maps and images that are not 8-bit (issue 12; data/pixels.py, docs/data.md).

16-bit grayscale is read at its real depth (round(v / 257): a map stored as 257 * k is exactly its
8-bit twin, in the transform and in training); formats with no exact 8-bit reading are refused
with one line naming the file; tools/check_dataset.py reports both.
"""
import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import transforms as tf
from data.datasets import DataError, load_rgb, load_saliency
from data.pixels import (PixelFormatError, png_bit_depth, saliency_to_8bit, sixteen_to_8bit,
                         to_8bit)
from test_saliency_sizes import make_sal_dataset
from test_train import base_argv, run_main


def write_png(path: Path, arr, bit_depth: int, color_type: int) -> Path:
    """A PNG written by hand (filter 0, one IDAT), for layouts PIL does not write: 16-bit colour,
    16-bit gray + alpha. color_type: 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA."""
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def sixteen_bit_twin(path8: Path, out: Path) -> Path:
    """The 16-bit grayscale PNG whose values are 257x those of an 8-bit grayscale PNG."""
    v = np.asarray(Image.open(path8).convert("L")).astype(np.uint16) * 257
    Image.fromarray(v).save(out)  # PIL writes a uint16 array as a 16-bit grayscale PNG
    assert Image.open(out).mode == "I;16" and png_bit_depth(out) == 16
    return out


def _map8(h=24, w=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------
def test_sixteen_to_8bit_is_round_v_over_257():
    v = np.arange(65536)
    assert np.array_equal(sixteen_to_8bit(v), np.round(v / 257).astype(np.uint8))
    assert np.array_equal(sixteen_to_8bit(np.arange(256) * 257), np.arange(256))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_gray_modes_read_at_full_depth(mode, tmp_path):
    a8 = _map8()
    v = a8.astype(np.uint32) * 257
    if mode == "I":
        img = Image.fromarray(v.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (32, 24), v.astype(dtype).tobytes())
    assert img.mode == mode
    out = saliency_to_8bit(img, tmp_path / "x.png")
    assert out.mode == "L" and np.array_equal(np.asarray(out), a8)


def test_sixteen_bit_map_is_identical_to_its_8bit_twin(tmp_path):
    p8 = tmp_path / "m8.png"
    Image.fromarray(_map8(), "L").save(p8)
    p16 = sixteen_bit_twin(p8, tmp_path / "m16.png")
    s8, s16 = load_saliency(p8, (32, 24)), load_saliency(p16, (32, 24))
    assert s16.mode == "L" and np.array_equal(np.asarray(s8), np.asarray(s16))
    # Before: convert("RGB") clipped every value above 255, so almost the whole map was 255.
    assert (np.asarray(Image.open(p16).convert("RGB")) == 255).mean() > 0.9
    img = Image.fromarray(np.random.RandomState(3).randint(0, 256, (24, 32, 3), dtype=np.uint8))
    for k in range(6):
        torch.manual_seed(k)
        a = tf.ClsSalTrainTransform(16, (16, 48), rng=random.Random(k))(img, s8)
        torch.manual_seed(k)
        b = tf.ClsSalTrainTransform(16, (16, 48), rng=random.Random(k))(img, s16)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sixteen_bit_gray_image_is_identical_to_its_8bit_twin(tmp_path):
    p8 = tmp_path / "i8.png"
    Image.fromarray(_map8(seed=4), "L").save(p8)
    p16 = sixteen_bit_twin(p8, tmp_path / "i16.png")
    assert np.array_equal(np.asarray(load_rgb(p8)), np.asarray(load_rgb(p16)))
    assert load_rgb(p16).mode == "RGB"


def _refused(tmp_path):
    """(file, expected reason) for every format refused for saliency maps."""
    rgb = np.random.RandomState(5).randint(0, 65536, (6, 8, 3)).astype(np.uint16)
    cases = [
        (write_png(tmp_path / "rgb16.png", rgb, 16, 2), "16-bit colour PNG"),
        (write_png(tmp_path / "rgba16.png", np.concatenate([rgb, rgb[..., :1]], -1), 16, 6),
         "16-bit colour/gray with alpha PNG"),
        (write_png(tmp_path / "la16.png", np.stack([rgb[..., 0], rgb[..., 1]], -1), 16, 4),
         "16-bit colour/gray with alpha PNG"),
        (write_png(tmp_path / "small16.png", np.full((6, 8), 200, np.uint16), 16, 0),
         "values only up to 200 of 65535"),
    ]
    Image.fromarray(np.full((6, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    shutil.copy(tmp_path / "f.tif", tmp_path / "float.png")   # PIL reads by content, not name
    cases.append((tmp_path / "float.png", "pixel mode F"))
    Image.fromarray(np.full((6, 8), 70000, np.int32)).save(tmp_path / "i.tif")
    shutil.copy(tmp_path / "i.tif", tmp_path / "int32.png")
    cases.append((tmp_path / "int32.png", "values 70000..70000"))
    la = np.stack([np.full((6, 8), 255, np.uint8), np.full((6, 8), 255, np.uint8)], -1)
    la[2:4, 2:4, 1] = 0
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    cases.append((tmp_path / "la.png", "mode-LA file with a transparent alpha"))
    rgba = np.full((6, 8, 4), 255, np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    cases.append((tmp_path / "rgba.png", "mode-RGBA file with a transparent alpha"))
    return cases


def test_unsupported_saliency_formats_give_one_line_naming_the_file(tmp_path):
    for path, reason in _refused(tmp_path):
        with pytest.raises(DataError) as e:
            load_saliency(path, (8, 6))
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and reason in msg, msg
        assert msg.endswith("save it as an 8-bit grayscale PNG (values 0..255)")
        assert isinstance(e.value, PixelFormatError) and e.value.reason in msg


def test_images_16bit_colour_refused_alpha_dropped_as_published(tmp_path):
    rgb = np.random.RandomState(6).randint(0, 65536, (6, 8, 3)).astype(np.uint16)
    p = write_png(tmp_path / "rgb16.png", rgb, 16, 2)
    with pytest.raises(DataError, match=r"image .*rgb16\.png is a 16-bit colour PNG.*8-bit image"):
        load_rgb(p)
    rgba = np.random.RandomState(7).randint(0, 256, (6, 8, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    # An image's alpha is dropped, as Image.open(p).convert("RGB") does in the published code.
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "rgba.png")), rgba[..., :3])


def test_8bit_modes_read_as_published(tmp_path):
    """1-bit, palette, opaque gray+alpha / RGBA, 2-bit and 8-bit files go on unchanged."""
    a = _map8(6, 8, seed=8)
    Image.fromarray(a, "L").convert("1").save(tmp_path / "b.png")
    Image.fromarray(a, "L").convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.stack([a, np.full_like(a, 255)], -1), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([a, a, a, np.full_like(a, 255)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(a // 64 * 85, "L").save(tmp_path / "l2.png", bits=2)
    write_png(tmp_path / "rgb8.png", np.dstack([a, a // 2, a // 3]), 8, 2)
    files = {name: tmp_path / f"{name}.png" for name in ("b", "p", "la", "rgba", "l2", "rgb8")}
    for name, path in files.items():
        opened = Image.open(path)
        out = load_saliency(path, (8, 6))
        assert out.mode == opened.mode, name
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(opened.convert("RGB"))), name
    assert png_bit_depth(files["l2"]) == 2 and png_bit_depth(files["rgb8"]) == 8
    assert png_bit_depth(files["b"]) == 1
    Image.fromarray(a, "L").save(tmp_path / "m.jpg")
    assert png_bit_depth(tmp_path / "m.jpg") is None


def test_to_8bit_is_header_only_for_8bit_files(tmp_path):
    Image.fromarray(_map8(), "L").save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as img:
        assert to_8bit(img, tmp_path / "m.png") is img
        assert img.tile  # still lazy: nothing was decoded


# ---------------------------------------------------------------------------------------------
# Training and tools/check_dataset.py
# ---------------------------------------------------------------------------------------------
def test_sixteen_bit_maps_train_with_the_8bit_losses(tmp_path):
    root = make_sal_dataset(tmp_path / "d8", n=8)
    run8 = run_main(base_argv(root, tmp_path / "runs", session="eight", iters=3))
    for p in sorted((root / "SALImages").glob("*.png"))[::2]:
        sixteen_bit_twin(p, p)
    run16 = run_main(base_argv(root, tmp_path / "runs", session="sixteen", iters=3))
    rec8, rec16 = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
                   for r in (run8, run16))
    keys = ("iter", "loss_cls", "loss_sal", "loss")
    assert [[r[k] for k in keys] for r in rec8] == [[r[k] for k in keys] for r in rec16]
    assert "4 16-bit maps read at full depth" in (run16 / "log.txt").read_text()


def test_unsupported_map_stops_training_before_compute(tmp_path):
    root = make_sal_dataset(tmp_path / "d", n=8)
    sal = root / "SALImages" / "img_005.png"
    w, h = Image.open(sal).size
    write_png(sal, np.zeros((h, w, 3), np.uint16), 16, 2)
    with pytest.raises(DataError, match=r"^1 of 8 ids have an image or saliency map that cannot "
                                        r"be read without wrong values \(img_005: saliency map "
                                        r".*img_005\.png is a 16-bit colour PNG"):
        run_main(base_argv(root, tmp_path / "runs"))
    assert not list((tmp_path / "runs").rglob("*.pth"))


def test_check_dataset_reports_bit_depths(tmp_path, capsys):
    from tools import check_dataset
    root = make_sal_dataset(tmp_path / "d", n=6)
    sal = root / "SALImages"
    sixteen_bit_twin(sal / "img_001.png", sal / "img_001.png")
    sixteen_bit_twin(sal / "img_002.png", sal / "img_002.png")
    w, h = Image.open(sal / "img_004.png").size
    write_png(sal / "img_004.png", np.zeros((h, w, 3), np.uint16), 16, 2)
    argv = ["--dataset", "custom", "--data-root", str(root), "--saliency-root", str(sal),
            "--list", "train", "--workers", "2"]
    report = check_dataset.main(check_dataset.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert not report.passed and report.ok["saliency"] == 5
    assert report.problems[("saliency", "unsupported pixel format")] == [
        f"{sal / 'img_004.png'} (a 16-bit colour PNG (PIL keeps only the high byte of each value))"]
    assert "WARNING: saliency: 2 16-bit grayscale files: read at full depth, round(v / 257) " \
           "(first: img_001, img_002)" in out
    assert "PROBLEMS: 1 of 6 ids" in out
