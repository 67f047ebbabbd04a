"""tools/make_saliency.py: saliency maps from a salient-object model through rembg, with a tiny
random-weight ONNX model (tests/onnx_models.py) in place of rembg's download."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.onnx_models import classifier_onnx, saliency_onnx
from tools import make_saliency as ms

pytest.importorskip("rembg")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
IDS = ["img_a", "img_b", "img_c", "img_d"]


def args_for(root: Path, *extra) -> object:
    argv = ["--data-root", str(root), "--list", "train", "--workers", "1", "--threads", "1",
            "--no-progress", *map(str, extra)]
    return ms.get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saliency_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture
def root(tmp_path) -> Path:
    """A custom root: four RGB JPEGs of different sizes and a train list (no labels.txt: the tool
    needs none)."""
    rng = np.random.default_rng(0)
    (tmp_path / "JPEGImages").mkdir()
    for k, i in enumerate(IDS):
        h, w = 30 + 4 * k, 40 - 3 * k
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "JPEGImages" / f"{i}.jpg", quality=95)
    (tmp_path / "train.txt").write_text("\n".join(IDS) + "\n")
    return tmp_path


def stamps(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


# ------------------------------------------------------------------------------------------------
# the map from a prediction: hand-computed values
# ------------------------------------------------------------------------------------------------
def test_raw_map_is_the_probability_times_255():
    pred = np.array([[0.0, 1.0], [0.2, 0.6]], np.float32)
    assert ms.raw_map(pred, (2, 2)).tolist() == [[0, 255], [51, 153]]
    assert ms.raw_map(pred, (2, 2), threshold=0.5).tolist() == [[0, 255], [0, 255]]
    # values a sigmoid may round past [0, 1] are clipped, not wrapped
    assert ms.raw_map(np.array([[-1e-4, 1.0001]], np.float32), (2, 1)).tolist() == [[0, 255]]
    # resized to the image's (W, H); a constant stays constant
    out = ms.raw_map(np.full((4, 4), 0.5, np.float32), (7, 3))
    assert out.shape == (3, 7) and (out == 128).all()


def test_rembg_map_stretches_each_prediction_to_its_min_max():
    pred = np.array([[0.4, 0.5], [0.45, 0.5]], np.float32)
    # (p - 0.4) / 0.1 * 255 truncated: 0, 255, 127 (127.5 truncated), 255
    assert ms.rembg_map(pred, (2, 2)).tolist() == [[0, 255], [127, 255]]
    assert ms.rembg_map(np.full((3, 3), 0.7, np.float32), (3, 3)).tolist() == [[0] * 3] * 3
    assert ms.is_constant(np.full((3, 3), 0.7)) and not ms.is_constant(pred)


def test_rembg_postprocess_equals_rembgs_own_predict(model, root):
    """--postprocess rembg is rembg's U^2-Net predict() map bit for bit (read from rembg's
    sessions/u2net.py; checked here against the installed rembg)."""
    config = ms.ModelConfig("u2net", str(model), 320, ms.IMAGENET_MEAN, ms.IMAGENET_STD, "rembg",
                            None, ("CPUExecutionProvider",), 1)
    session = ms.open_session(config)
    img = ms.read_rgb(root / "JPEGImages" / "img_b.jpg")
    ours, _ = ms.saliency_map(session, config, img)
    theirs = np.asarray(session.predict(img)[0])
    np.testing.assert_array_equal(ours, theirs)


def test_io_shape_checks():
    class T:
        def __init__(self, shape):
            self.shape = shape
    ok = ms.check_io_shapes([T([1, 3, 320, 320])], [T([1, 1, 320, 320])], None, "m")
    assert ok == 320
    assert ms.check_io_shapes([T(["n", 3, "h", "w"])], [T(["n", 1, "h", "w"])], 512, "m") == 512
    for inp, out, expect in [([1, 3, 224, 224], [1, 1000], "output"),
                             ([1, 1, 320, 320], [1, 1, 320, 320], "input"),
                             ([1, 3, 320, 320], [1, 2, 320, 320], "output"),
                             ([1, 3, 320, 320], [1, 1, 1, 1], "no map")]:
        with pytest.raises(ms.SaliencyError, match=f"not a saliency model.*{expect}"):
            ms.check_io_shapes([T(inp)], [T(out)], None, "m.onnx")
    with pytest.raises(ms.SaliencyError, match="--input-size is 512"):
        ms.check_io_shapes([T([1, 3, 320, 320])], [T([1, 1, 320, 320])], 512, "m.onnx")


# ------------------------------------------------------------------------------------------------
# the tool
# ------------------------------------------------------------------------------------------------
def test_maps_of_the_images_size_recorded_and_resumed(model, root):
    result = ms.main(args_for(root, "--model-path", model))
    sal = root / "SALImages"
    assert result["todo"] == len(IDS) and sorted(p.stem for p in sal.glob("*.png")) == IDS
    for i in IDS:
        with Image.open(sal / f"{i}.png") as m, Image.open(root / "JPEGImages" / f"{i}.jpg") as im:
            assert m.mode == "L" and m.size == im.size
    record = json.loads((sal / ms.RECORD_NAME).read_text())
    import hashlib
    assert record["weights_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert record["versions"]["rembg"] and record["versions"]["onnxruntime"]
    assert record["postprocess"] == "raw" and record["threshold"] is None
    assert record["last_run"]["written"] == len(IDS)
    # the maps are what training reads: the EPS dataset loads them as they are
    from data.datasets import load_saliency
    load_saliency(sal / "img_a.png", Image.open(root / "JPEGImages" / "img_a.jpg").size)

    # rerun: nothing recomputed; one map removed: only it is made again
    before = stamps(sal)
    assert ms.main(args_for(root, "--model-path", model))["todo"] == 0
    assert stamps(sal) == before
    (sal / "img_c.png").unlink()
    assert ms.main(args_for(root, "--model-path", model))["todo"] == 1
    after = stamps(sal)
    assert {k: v for k, v in after.items() if k != "img_c.png"} == \
        {k: v for k, v in before.items() if k != "img_c.png"}
    # dry run: counts, loads nothing, writes nothing
    (sal / "img_d.png").unlink()
    assert ms.main(args_for(root, "--model-path", model, "--dry-run"))["todo"] == 1
    assert not (sal / "img_d.png").exists()


def test_another_models_maps_are_refused_or_recomputed(model, root, tmp_path):
    ms.main(args_for(root, "--model-path", model, "--list", "train"))
    sal = root / "SALImages"
    (sal / "img_a.png").unlink()
    other = saliency_onnx(tmp_path / "other" / "other.onnx", seed=3)
    with pytest.raises(ms.SaliencyError, match="another model or setting.*weights_sha256"):
        ms.main(args_for(root, "--model-path", other))
    with pytest.raises(ms.SaliencyError, match="postprocess: 'raw' -> 'rembg'"):
        ms.main(args_for(root, "--model-path", model, "--postprocess", "rembg"))
    # a complete folder asked for with another model is refused too (not "nothing to do")
    ms.main(args_for(root, "--model-path", model))
    with pytest.raises(ms.SaliencyError, match="another model or setting.*weights_sha256"):
        ms.main(args_for(root, "--model-path", other))
    # ... also when asked for rembg's named model (whose weights are not hashed before loading)
    with pytest.raises(ms.SaliencyError, match="another model or setting.*model: 'tiny.onnx "):
        ms.main(args_for(root))
    before = stamps(sal)
    assert ms.main(args_for(root, "--model-path", other, "--overwrite"))["todo"] == len(IDS)
    assert all(stamps(sal)[k] != v for k, v in before.items())
    assert json.loads((sal / ms.RECORD_NAME).read_text())["weights_sha256"] == \
        ms.sha256_of(other)


def test_maps_without_a_record_are_refused(model, root):
    """A folder of downloaded maps (PFAN) is never mixed with a model's."""
    sal = root / "SALImages"
    sal.mkdir()
    Image.new("L", (40, 30)).save(sal / "img_a.png")
    with pytest.raises(ms.SaliencyError, match="no saliency_model.json.*PFAN"):
        ms.main(args_for(root, "--model-path", model))
    assert sorted(p.name for p in sal.iterdir()) == ["img_a.png"]


def test_grey_cmyk_and_16bit_images_give_the_maps_of_their_training_reading(model, root):
    """Images are read as training reads them (data.datasets.load_rgb): a grayscale or CMYK JPEG
    as its RGB conversion, a 16-bit grayscale PNG at full depth (257 k -> k), so its map equals
    the map of its 8-bit twin."""
    from data.datasets import load_rgb
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    jpg = root / "JPEGImages"
    Image.fromarray(grey, "L").save(jpg / "img_a.jpg")                          # grayscale JPEG
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("CMYK").save(
        jpg / "img_b.jpg")                                                       # CMYK JPEG
    Image.fromarray(grey, "L").save(jpg / "img_c.jpg", format="PNG")            # 8-bit PNG
    Image.fromarray(grey.astype(np.uint16) * 257).save(jpg / "img_d.jpg", format="PNG")  # 16-bit
    with Image.open(jpg / "img_d.jpg") as f:
        assert f.mode.startswith("I")
    for i in IDS:
        np.testing.assert_array_equal(np.asarray(ms.read_rgb(jpg / f"{i}.jpg")),
                                      np.asarray(load_rgb(jpg / f"{i}.jpg")))
    ms.main(args_for(root, "--model-path", model))
    sal = root / "SALImages"
    np.testing.assert_array_equal(np.asarray(Image.open(sal / "img_c.png")),
                                  np.asarray(Image.open(sal / "img_d.png")))


@pytest.mark.parametrize("case, expect", [
    ("missing image", r"1 of 4 listed ids have no image \(img_b "),
    ("list id not in the folder", r"1 of 5 listed ids have no image \(not_there "),
    ("corrupt image", r"1 of 4 images cannot be read.*img_c"),
    ("16-bit colour image", r"img_a.*16-bit colour"),
    ("classifier onnx", r"not a saliency model: output \[1, 10\]"),
    ("constant model", r"gives a constant map .* on the first 4 images"),
    ("logits, not probabilities", r"not a probability in \[0, 1\].*--postprocess rembg"),
    ("threshold", r"--threshold 1.5 must be in \(0, 1\]"),
    ("model file missing", r"--model-path .*nope.onnx: file not found; pass the path of a "
                           r"salient-object \.onnx"),
    ("not an onnx file", r"cannot load --model-path .*notes.onnx: .*not a readable ONNX model"),
    ("no rembg", r"pip install -r requirements-saliency.txt"),
])
def test_bad_input_is_one_error_before_any_output(model, root, tmp_path, monkeypatch, case, expect):
    path, extra = model, []
    if case == "missing image":
        (root / "JPEGImages" / "img_b.jpg").unlink()
    elif case == "list id not in the folder":
        (root / "train.txt").write_text("\n".join(IDS + ["not_there"]) + "\n")
    elif case == "corrupt image":
        (root / "JPEGImages" / "img_c.jpg").write_bytes(b"not an image")
    elif case == "16-bit colour image":
        import cv2
        cv2.imwrite(str(root / "JPEGImages" / "img_a.png"),
                    np.full((30, 40, 3), 40000, np.uint16))
        (root / "JPEGImages" / "img_a.png").rename(root / "JPEGImages" / "img_a.jpg")
    elif case == "classifier onnx":
        path = classifier_onnx(tmp_path / "m" / "cls.onnx")
    elif case == "constant model":
        path = saliency_onnx(tmp_path / "m" / "const.onnx", constant=True)
    elif case == "logits, not probabilities":
        path = saliency_onnx(tmp_path / "m" / "logit.onnx", sigmoid=False)
    elif case == "threshold":
        extra = ["--threshold", "1.5"]
    elif case == "model file missing":
        path = tmp_path / "nope.onnx"
    elif case == "not an onnx file":
        path = tmp_path / "notes.onnx"
        path.write_text("a text file, not a model\n")
    elif case == "no rembg":
        monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(ms.SaliencyError, match=expect) as err:
        ms.main(args_for(root, "--model-path", path, *extra))
    assert "\n" not in str(err.value)
    assert not (root / "SALImages").exists()


def test_logits_model_works_with_the_rembg_postprocess(root, tmp_path):
    path = saliency_onnx(tmp_path / "m" / "logit.onnx", sigmoid=False)
    ms.main(args_for(root, "--model-path", path, "--postprocess", "rembg"))
    maps = [np.asarray(Image.open(root / "SALImages" / f"{i}.png")) for i in IDS]
    # each prediction stretched to 0..255 at 320 px, then LANCZOS-shrunk to about 40 px
    assert all(m.max() >= 235 and m.max() - m.min() >= 150 for m in maps)


def test_only_this_tool_imports_rembg():
    pattern = re.compile(r"^\s*(import rembg|from rembg)", re.M)
    users = sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                   if ".venv" not in p.parts and pattern.search(p.read_text(encoding="utf-8")))
    assert [u for u in users if not u.startswith("tests/")] == ["tools/make_saliency.py"]


@pytest.mark.slow
def test_command_line_with_worker_processes(model, root):
    """The CLI with 2 spawned workers (each its own session), then a one-line refusal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "make_saliency.py"), "--data-root", str(root),
           "--list", "train", "--model-path", str(model), "--workers", "2", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 workers x 1 threads; 4 of 4 maps to make" in proc.stderr
    assert len(list((root / "SALImages").glob("*.png"))) == len(IDS)
    proc = subprocess.run(cmd[:-4] + ["--postprocess", "rembg"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("make_saliency.py: error:")
