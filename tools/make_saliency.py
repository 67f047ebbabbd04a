"""Saliency maps for any list of images with a salient-object model (U^2-Net by default), written
as ``<out>/<id>.png``: 8-bit grayscale at the image's size, exactly what EPS training reads
(data/saliency.py, data/datasets.py ClsSalDataset). docs/custom-data.md walks through it.

    python tools/make_saliency.py --data-root my_data --list train              # U^2-Net (DUTS-TR)
    python tools/make_saliency.py --data-root my_data --list train --model-path u2net.onnx

The model runs through ``rembg`` (MIT; an optional dependency: ``pip install -r
requirements-saliency.txt``), which fetches the weights on first use and picks the onnxruntime
provider. Only its model session and its input preprocessing are used; the map is made here:

* rembg's ``remove()`` is NOT used: it turns the image by its EXIF orientation tag (the map would
  then not line up with the image as EPS reads it, untransposed) and returns a cut-out.
* rembg's U^2-Net ``predict()`` (sessions/u2net.py) rescales every prediction to its own
  min..max, truncates it to uint8 at 320x320 and resizes that with LANCZOS. The min..max stretch
  makes an image in which the model sees nothing as bright as one with a clear object (the
  "grey maps" of the issue trackers), and EPS thresholds the map at 0.5. So by default
  (``--postprocess raw``) the map is the model's own probability: ``round(255 * p)`` after a
  bilinear resize of ``p`` to the image's size (as U^2-Net's u2net_test.py resizes its output).
  ``--postprocess rembg`` reproduces rembg's ``predict()`` map bit for bit.
* no threshold (``--threshold`` asks for one) and no alpha matting (a cut-out refinement).

Images are read as the training code reads them (data/pixels.py): grayscale and CMYK JPEGs as
their RGB conversion, 16-bit grayscale at full depth, other formats refused. A record of the
model (name, weights sha256, pre- and post-processing, rembg and onnxruntime versions) is written
to ``<out>/saliency_model.json`` before the first map. A rerun skips existing maps of the same
model (resume); a folder holding another model's maps, or maps without a record (e.g. PFAN's
download), is refused unless ``--overwrite``. Every file is written atomically.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from data.errors import DataError  # noqa: E402
from data.pixels import image_to_8bit  # noqa: E402
from data.registry import DATASETS, check_data_root, dataset_root_of, get_dataset_files  # noqa: E402
from utils import flags  # noqa: E402
from utils.cli import add_flag, parent_parser, run_cli  # noqa: E402
from utils.errors import UserError, examples  # noqa: E402
from utils.fetch import sha256_of  # noqa: E402
from utils.io import atomic_write_text, remove_stale_temps, save_label_png  # noqa: E402
from utils.progress import Progress  # noqa: E402

logger = logging.getLogger("make_saliency")

RECORD_NAME = "saliency_model.json"
FORMAT_VERSION = 1
INSTALL = "pip install -r requirements-saliency.txt (rembg with onnxruntime)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POSTPROCESS = ("raw", "rembg")
# A prediction whose values span less than this is constant: no map can come from it.
CONSTANT_SPREAD = 1e-6
# Raw outputs must be probabilities; float rounding of a sigmoid may step this far outside [0, 1].
PROB_TOLERANCE = 1e-3
PROBE_IMAGES = 4  # images run before any output exists (shape, range and constant checks)


class SaliencyError(UserError):
    """A bad flag, input or model; the message names it and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """How a model is fed (rembg's session for it: input size, mean and std of its
    ``normalize`` call) and what it was trained on (for the record and the docs)."""
    session: str
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    trained_on: str


# The salient-object models rembg runs with the U^2-Net / IS-Net preprocessing (rembg
# sessions/u2net.py, u2netp.py, dis_general_use.py: the arguments of their normalize calls).
MODELS: Dict[str, ModelSpec] = {
    "u2net": ModelSpec("u2net", 320, IMAGENET_MEAN, IMAGENET_STD,
                       "DUTS-TR (salient object detection; U^2-Net, Qin et al. 2020, 176 MB)"),
    "u2netp": ModelSpec("u2netp", 320, IMAGENET_MEAN, IMAGENET_STD,
                        "DUTS-TR (the 4.7 MB light U^2-Net)"),
    "isnet-general-use": ModelSpec("isnet-general-use", 1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0),
                                   "DIS5K (dichotomous image segmentation; IS-Net, Qin et al. 2022)"),
}
DEFAULT_MODEL = "u2net"


# ------------------------------------------------------------------------------------------------
# pure functions: the map from a prediction (tested in tests/test_make_saliency.py)
# ------------------------------------------------------------------------------------------------
def is_constant(pred: np.ndarray) -> bool:
    pred = np.asarray(pred, dtype=np.float64)
    return bool(pred.size == 0 or float(pred.max() - pred.min()) < CONSTANT_SPREAD)


def raw_map(pred: np.ndarray, size: Tuple[int, int], threshold: Optional[float] = None) -> np.ndarray:
    """uint8 (H, W) map of a probability prediction ``pred`` (h, w) in [0, 1] for an image of
    ``size`` (W, H): ``p`` resized bilinearly (float), clipped to [0, 1], then ``round(255 p)``,
    or ``255 * (p >= threshold)``."""
    p = np.clip(np.asarray(pred, dtype=np.float32), 0.0, 1.0)
    if p.shape[::-1] != tuple(size):
        p = np.asarray(Image.fromarray(p, mode="F").resize(tuple(size), Image.Resampling.BILINEAR))
    p = np.clip(p, 0.0, 1.0)
    if threshold is not None:
        return np.where(p >= threshold, 255, 0).astype(np.uint8)
    return np.round(p * 255.0).astype(np.uint8)


def rembg_map(pred: np.ndarray, size: Tuple[int, int], threshold: Optional[float] = None) -> np.ndarray:
    """rembg 2.0.86's U^2-Net ``predict()`` map (sessions/u2net.py): ``pred`` rescaled to its
    own min..max, ``* 255`` truncated to uint8, LANCZOS-resized to ``size`` (W, H); with
    ``threshold``, ``255 * (map >= 255 * threshold)``. A constant prediction (rembg divides by
    zero) gives an all-zero map here."""
    pred = np.asarray(pred, dtype=np.float32)
    lo, hi = float(pred.min()), float(pred.max())
    if hi - lo < CONSTANT_SPREAD:
        small = np.zeros(pred.shape, np.uint8)
    else:
        small = (np.clip((pred - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(small, mode="L").resize(tuple(size), Image.Resampling.LANCZOS))
    if threshold is not None:
        return np.where(out >= 255.0 * threshold, 255, 0).astype(np.uint8)
    return out.copy()


MAPPERS = {"raw": raw_map, "rembg": rembg_map}


def prediction_plane(output: np.ndarray) -> np.ndarray:
    """The (h, w) map of one image from a model output of shape (1, 1, h, w) or (1, h, w)."""
    out = np.asarray(output)
    if out.ndim == 4 and out.shape[:2] == (1, 1):
        return out[0, 0]
    if out.ndim == 3 and out.shape[0] == 1:
        return out[0]
    raise SaliencyError(f"the model's first output has shape {list(out.shape)}; a saliency model "
                        f"gives one map per image, 1x1xHxW: pass a salient-object model")


def check_io_shapes(inputs: Sequence, outputs: Sequence, input_size: Optional[int],
                    what: str) -> int:
    """The model's input side (static, or ``input_size`` when the ONNX leaves it open), after
    checking that it takes one 1x3xSxS image and gives 1x1xHxW maps (from the ONNX's declared
    shapes; symbolic dimensions pass). A SaliencyError names what does not fit."""
    def dims(shape):
        return ["?" if not isinstance(d, int) else d for d in shape]

    problems = []
    if len(inputs) != 1:
        problems.append(f"{len(inputs)} inputs (expected one image)")
    ishape = list(inputs[0].shape) if inputs else []
    oshape = list(outputs[0].shape) if outputs else []
    if len(ishape) != 4 or (isinstance(ishape[1], int) and ishape[1] != 3) \
            or (isinstance(ishape[0], int) and ishape[0] != 1 and ishape[0] > 0):
        problems.append(f"input {dims(ishape)} (expected 1x3xSxS)")
    if not oshape or len(oshape) not in (3, 4) or (len(oshape) == 4 and isinstance(oshape[1], int)
                                                   and oshape[1] != 1):
        problems.append(f"output {dims(oshape)} (expected 1x1xHxW)")
    elif any(isinstance(d, int) and d < 2 for d in oshape[-2:]):
        problems.append(f"output {dims(oshape)} is no map (expected 1x1xHxW, H and W > 1)")
    if problems:
        raise SaliencyError(f"{what} is not a saliency model: {'; '.join(problems)}; pass the ONNX "
                            f"file of a salient-object model (e.g. rembg's u2net.onnx)")
    side = [d for d in ishape[2:] if isinstance(d, int) and d > 0]
    if len(side) == 2:
        if side[0] != side[1]:
            raise SaliencyError(f"{what} takes {side[0]}x{side[1]} inputs; the U^2-Net "
                                f"preprocessing resizes to a square, so pass a model with square "
                                f"inputs")
        if input_size is not None and input_size != side[0]:
            raise SaliencyError(f"{what} takes {side[0]}x{side[0]} inputs but --input-size is "
                                f"{input_size}; leave --input-size out or pass {side[0]}")
        return side[0]
    return input_size


# ------------------------------------------------------------------------------------------------
# images (as the training code reads them) and the model session
# ------------------------------------------------------------------------------------------------
def read_rgb(path) -> Image.Image:
    """An image as EPS training reads it (data.datasets.load_rgb: ``convert("RGB")`` of the
    exact 8-bit reading, data/pixels.py; no EXIF rotation); torch-free for the workers."""
    try:
        with Image.open(path) as img:
            img.load()
            return image_to_8bit(img, path).convert("RGB")
    except DataError as e:
        raise SaliencyError(str(e)) from None
    except FileNotFoundError:
        raise SaliencyError(f"image not found: {path}; check --data-root or the list") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise SaliencyError(f"cannot read image {path} ({e}); replace the file or remove its id "
                            f"from the list") from None


def image_problem(path) -> Optional[str]:
    """Why an image cannot be read as training reads it (header only for 8-bit files), or None."""
    try:
        with Image.open(path) as img:
            image_to_8bit(img, path)
        return None
    except DataError as e:
        return str(e)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"cannot read image {path} ({e})"


def import_rembg():
    """rembg and onnxruntime, or a one-line SaliencyError saying what to install."""
    try:
        import onnxruntime  # noqa: F401
        import rembg  # noqa: F401
        from rembg import new_session  # noqa: F401
    except ImportError as e:
        raise SaliencyError(f"the saliency models need rembg and onnxruntime ({e}): {INSTALL}") from None
    return rembg


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("rembg", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@contextmanager
def _models_dir(folder: Path) -> Iterator[None]:
    """rembg's custom sessions load a file only from inside its models folder (REMBG_HOME, or
    U2NET_HOME when that is set; rembg sessions/base.py validate_model_path): point it at the
    file's own folder for the call."""
    saved = {k: os.environ.get(k) for k in ("REMBG_HOME", "U2NET_HOME")}
    os.environ["REMBG_HOME"] = str(folder)
    os.environ.pop("U2NET_HOME", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def providers_for(device: str) -> List[str]:
    """onnxruntime providers for --device (cuda refused when this onnxruntime has none)."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise SaliencyError(f"--device cuda, but this onnxruntime has no CUDA provider (it has "
                            f"{', '.join(available)}): pip install onnxruntime-gpu in place of "
                            f"onnxruntime, or --device cpu")
    if device != "cpu" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything a worker needs to rebuild the same session (picklable)."""
    name: str
    model_path: Optional[str]
    input_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    postprocess: str
    threshold: Optional[float]
    providers: Tuple[str, ...]
    threads: int


def open_session(config: ModelConfig):
    """A rembg session for the model (downloading the named model's weights on first use)."""
    import onnxruntime as ort
    from rembg import new_session
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, config.threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # onnxruntime's own warnings are not the user's business
    try:
        if config.model_path is None:
            return new_session(config.name, sess_opts=opts, providers=list(config.providers))
        path = Path(config.model_path).resolve()
        with _models_dir(path.parent):
            return new_session("u2net_custom", sess_opts=opts, model_path=str(path),
                               providers=list(config.providers))
    except UserError:
        raise
    except Exception as e:  # onnxruntime / pooch raise many types; name the model and the fix
        detail = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if config.model_path:
            raise SaliencyError(f"cannot load --model-path {config.model_path}: {detail}; it is not "
                                f"a readable ONNX model: pass a salient-object .onnx file (e.g. "
                                f"rembg's u2net.onnx)") from None
        raise SaliencyError(f"cannot load --model {config.name} (rembg downloads it on first use): "
                            f"{detail}; on a machine without internet download the .onnx file "
                            f"elsewhere and pass --model-path") from None


def model_file(session, config: ModelConfig) -> Path:
    if config.model_path is not None:
        return Path(config.model_path).resolve()
    return Path(type(session).download_models())


def predict(session, config: ModelConfig, img: Image.Image) -> np.ndarray:
    """The model's first output for one image, as an (h, w) float array (rembg's U^2-Net input:
    ``normalize`` resizes to input_size x input_size with LANCZOS, divides by the image's
    maximum and standardises with the model's mean and std)."""
    feed = session.normalize(img, config.mean, config.std, (config.input_size, config.input_size))
    out = session.inner_session.run(None, feed)[0]
    return prediction_plane(out).astype(np.float32)


def saliency_map(session, config: ModelConfig, img: Image.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 map at the image's size, the raw prediction) of one RGB image."""
    pred = predict(session, config, img)
    return MAPPERS[config.postprocess](pred, img.size, config.threshold), pred


def check_prediction(pred: np.ndarray, config: ModelConfig, where: str) -> None:
    """A raw-mode prediction must be a probability map."""
    if not np.isfinite(pred).all():
        raise SaliencyError(f"the model gave non-finite values for {where}: not a working "
                            f"saliency model (check the ONNX file)")
    if config.postprocess == "raw":
        lo, hi = float(pred.min()), float(pred.max())
        if lo < -PROB_TOLERANCE or hi > 1 + PROB_TOLERANCE:
            raise SaliencyError(
                f"the model's output for {where} spans {lo:.3g}..{hi:.3g}, not a probability in "
                f"[0, 1] (a model without its final sigmoid?); --postprocess raw keeps the model's "
                f"probability: pass a model that outputs one, or --postprocess rembg to rescale "
                f"each prediction to its own min..max as rembg does")


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------
_WORKER = {}


def _init_worker(parent_pid: int, config: ModelConfig) -> None:
    from utils.workers import die_with_parent
    die_with_parent(parent_pid)
    _WORKER["session"] = open_session(config)
    _WORKER["config"] = config


def make_one(job: Tuple[str, str, str]) -> Tuple[str, bool]:
    """Read one image, write its map atomically; returns (id, prediction was constant)."""
    img_id, image_path, out_path = job
    session, config = _WORKER["session"], _WORKER["config"]
    img = read_rgb(image_path)
    sal, pred = saliency_map(session, config, img)
    check_prediction(pred, config, f"image {image_path}")
    save_label_png(out_path, sal, palette=False)
    return img_id, is_constant(pred)


def run_jobs(jobs: Sequence[Tuple[str, str, str]], config: ModelConfig, session, workers: int,
             progress: bool) -> List[str]:
    """Make every map; returns the ids whose prediction was constant. One worker runs in this
    process (its session is ``session``); more run in spawned processes that die with it."""
    constant: List[str] = []
    bar = Progress(len(jobs), "saliency maps", unit="img", enabled=progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _WORKER.update(session=session, config=config)
            results = map(make_one, jobs)
            for img_id, const in results:
                constant += [img_id] if const else []
                bar.update(1)
        else:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                              initargs=(os.getpid(), config)) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers)))
                for img_id, const in pool.imap_unordered(make_one, jobs, chunksize=chunk):
                    constant += [img_id] if const else []
                    bar.update(1)
    finally:
        bar.close()
    return constant


# ------------------------------------------------------------------------------------------------
# the record beside the maps
# ------------------------------------------------------------------------------------------------
# Record keys that decide the maps' values: a folder's maps are "the same model's" when they agree.
IDENTITY = ("format_version", "weights_sha256", "input_size", "mean", "std", "postprocess",
            "threshold", "spec")


def make_record(config: ModelConfig, weights: Path, sha: str, trained_on: str) -> Dict:
    return dict(
        tool="tools/make_saliency.py", format_version=FORMAT_VERSION,
        model=config.name if config.model_path is None else
        f"{Path(config.model_path).name} (a local file, fed as {config.name})",
        spec=config.name,
        trained_on=trained_on, weights_file=str(weights), weights_sha256=sha,
        input_size=config.input_size, mean=list(config.mean), std=list(config.std),
        preprocessing="rembg BaseSession.normalize: LANCZOS resize to input_size, / image max, "
                      "(x - mean) / std",
        postprocess=config.postprocess, threshold=config.threshold,
        postprocessing=("probability -> bilinear resize to the image size -> round(255 p)"
                        if config.postprocess == "raw" else
                        "rembg U^2-Net predict(): min..max rescale, uint8 truncation, LANCZOS "
                        "resize to the image size") + (f"; binarised at {config.threshold}"
                                                       if config.threshold is not None else ""),
        versions=versions(), providers=list(config.providers))


def read_record(folder: Path) -> Optional[Dict]:
    path = folder / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SaliencyError(f"{path} is not a readable record ({e}); delete it and pass "
                            f"--overwrite to remake the maps, or choose another --out") from None


def record_mismatch(prev: Dict, now: Dict, keys=IDENTITY) -> Dict[str, Tuple]:
    """{key: (previous, now)} for the ``keys`` that differ (the identity keys by default)."""
    # JSON turns tuples into lists: compare the JSON forms
    return {k: (prev.get(k), now.get(k)) for k in keys
            if json.dumps(prev.get(k)) != json.dumps(now.get(k))}


def refuse_other_maps(out: Path, diff: Dict[str, Tuple], model: str = "") -> None:
    """The one refusal of a folder holding another model's or setting's maps."""
    if diff:
        text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise SaliencyError(f"{out} holds maps of another model or setting ({model}{text}): "
                            f"choose another --out, or pass --overwrite to recompute every "
                            f"listed map")


def check_settings_match(prev: Dict, args, out: Path, model_sha: Optional[str] = None) -> None:
    """A complete folder asked for with other settings: refused as an incomplete one would be.
    Checked without loading the model (a named model's weights are not hashed here; a
    --model-path file's digest is ``model_sha`` when the caller has it)."""
    spec = MODELS[args.model]
    now = dict(format_version=FORMAT_VERSION, mean=list(spec.mean), std=list(spec.std),
               postprocess=args.postprocess, threshold=args.threshold, spec=args.model)
    if args.model_path is not None:
        now["weights_sha256"] = model_sha or sha256_of(args.model_path)
    else:  # a named model's weights are not hashed here: its record names it (make_record)
        now["model"] = args.model
    refuse_other_maps(out, record_mismatch(prev, now, keys=now))


def check_folder(out: Path, args, done, model_sha: Optional[str] = None) -> None:
    """Before any model is loaded: a folder holding maps without a record (e.g. PFAN's), or a
    record of another model or setting, is refused unless --overwrite (tools/preflight.py runs
    this too)."""
    if not done or args.overwrite:
        return
    prev = read_record(out)
    if prev is None:
        raise SaliencyError(f"{out} holds {len(done)} maps but no {RECORD_NAME} saying which "
                            f"model made them (e.g. downloaded PFAN maps): choose another "
                            f"--out, or pass --overwrite to replace the listed ones")
    check_settings_match(prev, args, out, model_sha)


def existing_maps(folder: Path) -> List[str]:
    if not folder.is_dir():
        return []
    return [e.name[:-4] for e in os.scandir(folder)
            if e.name.endswith(".png") and not e.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# the tool
# ------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("Saliency maps from a salient-object model")
    flags.add_data_root(p, help="dataset root (the folder holding JPEGImages/, or train2014/ "
                                "for COCO)")
    add_flag(p, "--list", type=str, required=True,
             help="id list: a split name of the dataset (e.g. train) or a list file")
    flags.add_dataset(p, DATASETS, default="custom",
                      help="dataset layout (default custom: the VOC layout with the lists in the "
                           "root; the paper used PFAN maps for voc12 and coco)")
    flags.add_metadata_dir(p)
    add_flag(p, "--out", type=Path, default=None,
             help="folder for <id>.png (default: <data root>/SALImages, where training looks)")
    add_flag(p, "--model", type=str, default=DEFAULT_MODEL, choices=sorted(MODELS),
             help="salient-object model run by rembg (default u2net: U^2-Net trained on DUTS-TR, "
                  "like the paper's PFAN); with --model-path: the preprocessing to feed the "
                  "file with")
    add_flag(p, "--model-path", type=Path, default=None,
             help="a local ONNX file instead of rembg's download (machines without internet: "
                  "rembg's u2net.onnx from its GitHub releases)")
    add_flag(p, "--input-size", type=int, default=None,
             help="model input side when the ONNX leaves it open (default: the --model's, "
                  "u2net 320)")
    add_flag(p, "--postprocess", type=str, default="raw", choices=POSTPROCESS,
             help="raw: the model's probability, round(255 p) (default); rembg: rembg's "
                  "predict() map, each prediction stretched to its own min..max")
    add_flag(p, "--threshold", type=float, default=None,
             help="binarise the map at this probability (0/255); default: keep the continuous "
                  "map (EPS thresholds it at 0.5 itself)")
    add_flag(p, "--workers", type=int, default=None,
             help="CPU worker processes, each with its own model session (default: "
                  "min(4, cores); 1 with CUDA)")
    add_flag(p, "--threads", type=int, default=None,
             help="onnxruntime threads per worker (default: cores / workers)")
    add_flag(p, "--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
             help="auto: onnxruntime's CUDA provider when it has one (onnxruntime-gpu), else the "
                  "CPU; cuda: refuse to run without it")
    flags.add_skip_missing(p, "image")
    flags.add_overwrite(p, "recompute every listed map, also over another model's (default: "
                           "skip existing maps of the same model = resume)")
    add_flag(p, "--dry-run", action=argparse.BooleanOptionalAction, default=False,
             help="print how many maps are missing and exit (no model is loaded, nothing is "
                  "written)")
    add_flag(p, "--progress", action=argparse.BooleanOptionalAction, default=True,
             help="progress bar on a terminal, a log line every 10 s elsewhere")
    return p


def check_args(args) -> None:
    problems = []
    if args.threshold is not None and not (math.isfinite(args.threshold) and 0 < args.threshold <= 1):
        problems.append(f"--threshold {args.threshold} must be in (0, 1]")
    for flag, value in (("--workers", args.workers), ("--threads", args.threads),
                        ("--input-size", args.input_size)):
        if value is not None and value < 1:
            problems.append(f"{flag} {value} must be >= 1")
    if args.input_size is not None and args.model_path is None \
            and args.input_size != MODELS[args.model].input_size:
        problems.append(f"--input-size {args.input_size}: --model {args.model} takes "
                        f"{MODELS[args.model].input_size}; --input-size is for --model-path files")
    if args.model_path is not None and not args.dry_run and not Path(args.model_path).is_file():
        problems.append(f"--model-path {args.model_path}: file not found; pass the path of a "
                        f"salient-object .onnx file (e.g. rembg's u2net.onnx), or leave out "
                        f"--model-path to let rembg download --model")
    if problems:
        raise SaliencyError("; ".join(problems))


def resolve_jobs(args) -> Tuple[Path, List[Tuple[str, Path]], List[str]]:
    """(output folder, [(id, image path)] of the listed ids, ids dropped as missing)."""
    check_data_root(args.data_root, "--data-root")
    files = get_dataset_files(args.dataset, args.metadata_dir, args.data_root)
    ids = files.read_ids(args.list)
    out = args.out if args.out is not None else \
        dataset_root_of(args.data_root) / files.spec.saliency_dir
    pairs = [(i, files.image_path(args.data_root, i)) for i in ids]
    missing = [f"{i} ({p})" for i, p in pairs if not p.is_file()]
    if missing and not args.skip_missing:
        raise SaliencyError(f"{len(missing)} of {len(ids)} listed ids have no image "
                            f"({examples(missing)}): fix --data-root or the list, or pass "
                            f"--skip-missing to drop them")
    if missing:
        logger.warning("skipping %d of %d listed ids without an image (first: %s)",
                       len(missing), len(ids), examples(missing))
        pairs = [(i, p) for i, p in pairs if p.is_file()]
        if not pairs:
            raise SaliencyError(f"no listed id has an image under {args.data_root}: check the root")
    return out, pairs, missing


def main(args) -> Dict:
    check_args(args)
    out, pairs, _ = resolve_jobs(args)
    done = set(existing_maps(out))
    listed = {i for i, _ in pairs}
    todo = pairs if args.overwrite else [(i, p) for i, p in pairs if i not in done]
    if args.dry_run:
        print(f"{len(todo)} of {len(pairs)} saliency maps to make -> {out}", flush=True)
        return {"todo": len(todo), "listed": len(pairs), "out": str(out)}
    # a --model-path file is hashed once: for the folder check now and the record below
    model_sha = sha256_of(args.model_path) if args.model_path is not None and done else None
    check_folder(out, args, done, model_sha)
    prev = read_record(out)
    if not todo:
        logger.info("all %d maps of the list exist in %s; nothing to do (--overwrite remakes "
                    "them)", len(pairs), out)
        return {"todo": 0, "listed": len(pairs), "out": str(out), "record": prev}

    from utils.run import check_writable  # here: it imports torch, which the workers need not
    check_writable(out, "--out")  # before any image or model is read, not at the first write
    # every input before any compute: the images' headers, the model and its shapes
    with_problems = [f"{i}: {p}" for i, p in ((i, image_problem(path)) for i, path in todo) if p]
    if with_problems:
        raise SaliencyError(f"{len(with_problems)} of {len(todo)} images cannot be read as "
                            f"training reads them ({examples(with_problems)}); fix these files "
                            f"or remove their ids from the list")
    import_rembg()
    spec = MODELS[args.model]
    cores = os.cpu_count() or 1
    providers = tuple(providers_for(args.device))
    on_gpu = providers[0] != "CPUExecutionProvider"
    workers = args.workers or (1 if on_gpu else min(4, cores, len(todo)))
    threads = args.threads or max(1, cores // workers)
    probe_config = ModelConfig(args.model, str(args.model_path) if args.model_path else None,
                               args.input_size or spec.input_size, spec.mean, spec.std,
                               args.postprocess, args.threshold, providers, threads)
    session = open_session(probe_config)
    what = f"--model-path {args.model_path}" if args.model_path else f"--model {args.model}"
    size = check_io_shapes(session.inner_session.get_inputs(), session.inner_session.get_outputs(),
                           args.input_size if args.model_path else spec.input_size, what)
    config = ModelConfig(**{**asdict(probe_config), "input_size": size or spec.input_size})
    if on_gpu and "CUDAExecutionProvider" not in session.inner_session.get_providers():
        if args.device == "cuda":
            raise SaliencyError("--device cuda, but onnxruntime could not start its CUDA provider "
                                "(CUDA / cuDNN libraries missing or of another version); fix them "
                                "or --device cpu")
        logger.warning("onnxruntime's CUDA provider did not start: running on the CPU")
    weights = model_file(session, config)
    record = make_record(config, weights, model_sha or sha256_of(weights), spec.trained_on
                         if args.model_path is None else f"unknown (a local file fed as {args.model})")

    # the folder: the same model's maps (resume), or refused unless --overwrite
    if done and not args.overwrite:
        refuse_other_maps(out, record_mismatch(prev, record),  # a named model's weights too
                          model=f"model {prev.get('model')!r}; ")
    if args.overwrite and done and (prev is None or record_mismatch(prev, record)):
        others = len(done - listed)
        if others:
            logger.warning("%d maps in %s are not in this list and stay as they are (made by "
                           "another model or setting)", others, out)

    # probe: the first images through the model before anything is written
    probes = []
    for img_id, path in todo[:PROBE_IMAGES]:
        pred = predict(session, config, read_rgb(path))
        check_prediction(pred, config, f"image {path}")
        probes.append(pred)
    if all(is_constant(p) for p in probes):
        raise SaliencyError(f"{what} gives a constant map ({float(probes[0].flat[0]):.4g} "
                            f"everywhere) on the first {len(probes)} images: not a working "
                            f"saliency model (wrong or untrained weights?); pass another model")

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    atomic_write_text(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    logger.info("model %s (%s), sha256 %s..., %s on %s; %d workers x %d threads; %d of %d maps "
                "to make -> %s", config.name, weights.name, record["weights_sha256"][:12],
                config.postprocess, providers[0], workers, threads, len(todo), len(pairs), out)
    jobs = [(i, str(p), str(out / f"{i}.png")) for i, p in todo]
    constant = run_jobs(jobs, config, session, workers if not on_gpu else 1, args.progress)
    record["last_run"] = dict(
        list=str(args.list), listed=len(pairs), written=len(jobs), constant=len(constant),
        constant_ids=constant[:20],
        finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    atomic_write_text(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    if constant:
        logger.warning("%d of %d predictions were constant (first: %s): their maps carry no "
                       "saliency; look at those images, or try another --model", len(constant),
                       len(jobs), examples(constant))
    logger.info("wrote %d saliency maps to %s (record: %s)", len(jobs), out, out / RECORD_NAME)
    return {"todo": len(jobs), "listed": len(pairs), "out": str(out), "record": record,
            "constant": constant}


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
