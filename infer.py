"""CAMs and pseudo-masks from a trained (or released) EPS / baseline classifier.

    python infer.py --dataset voc12 --infer-list metadata/voc12/train.txt \\
        --data-root $VOC/JPEGImages --weights checkpoint_cls.pth --thr 0.20 \\
        --cam-dir out/cam --png-dir out/png --vis-dir out/vis

Defaults reproduce the published infer.py (docs/inference.md): scales 0.5/1/1.5/2 plus the
horizontal flip of each, bicubic resizing with Python round() sizes, the head's per-view
non-linearity (cls: ReLU CAMs; eps: softmax over the C+1 maps at feature resolution, background
map dropped), upsampling, CAMs masked by the image labels, per-class max normalisation (+1e-5),
pseudo-mask = argmax([0.20; cams]). The published command line (--img_root, --infer_list,
--cam_png, ...) is accepted unchanged.

Outputs (all optional, written atomically, one file per image):
  --cam-dir (--cam_npy)  <id>.npz: keys int64 (K,), cams float32 (K,H,W) [, bg float32 (H,W)]
  --png-dir (--cam_png)  <id>.png: palette PNG, values 0..C (0 = background)
  --crf                  <id>.png: CRF-refined pseudo-mask (psa or DeepLab parameters)
  --vis-dir              <id>.png for the first --vis-num ids of the list: image, mask, CAMs
``--labels predicted`` masks the CAMs with the classifier's own multi-label prediction instead of
image_labels.txt (images without labels; docs/custom-data.md): the classes whose sigmoid score on
the unflipped view nearest scale 1 reaches --label-thr, or the top class when none does. The labels
used go beside the output folders (into their parent, or into --run-dir when given; never into a
folder of per-image results): predicted_labels/<id>.txt (one record per image, written by
whichever rank made it) and, once every id has one, predicted_labels.txt (image_labels.txt format)
and predicted_scores.csv.
A rerun skips ids whose requested outputs all exist (resume); --overwrite recomputes them. Each
output folder records the settings that made it, and a rerun with other settings is refused.
Under torchrun every rank takes ids[rank::world] and writes into the same folders. No process
group is joined: the ranks finish independently. When the launch spans several nodes, rank 0
returns only once every rank's outputs exist (a file poll; --dist-timeout without a new file
stops it), so that the evaluation that follows it on node 0 scores the whole list.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.datasets import InferDataset, check_files
from data.metadata import MetadataError
from data.registry import DATASETS, check_data_root, get_dataset
from data.transforms import INFER_SCALES
from network import NETWORKS, normalize_network_name
from network.heads import Head
from network.inference import InferenceModel, SpeedOptions, prepare_for_inference
from network.weights import load_network
from network import cam as camlib
from utils import dist, flags, provenance
from utils.cli import add_flag, parent_parser, run_cli
from utils.crf import CRF_PRESETS, cam_crf, crf_mask
from utils.device import check_shared_memory, configure_numerics, pin_memory, resolve_device
from utils.errors import UserError
from utils.io import atomic_write_text, remove_stale_temps, save_label_png, save_npz
from utils.progress import Progress
from utils.run import check_writable, setup_logging, write_run_info
from utils.vis import save_cam_overview
from utils.workers import executor, loader_worker_init

logger = logging.getLogger("infer")
# True when infer.py is the program (python infer.py, torchrun infer.py): settings that last for
# the whole process (network/cpu/memory.py) are then ours to make; a caller of main() keeps its own
OWN_PROCESS = False


class InferError(UserError):
    """A bad flag combination or a checkpoint that does not fit; the message says the fix."""


# Flags whose value changes what is written: every output folder records them, and a resumed
# run must use the same ones (--fast / --fuse / --winograd / --channels-last / --num-workers only
# change the speed).
RESULT_FLAGS = ("dataset", "weights", "network", "thr", "scales", "bg_from_eps", "save_bg",
                "crf_alpha", "crf_t", "crf_params", "amp", "labels", "label_thr")
# What a settings record written before a flag existed meant by its absence.
RESULT_DEFAULTS = {"labels": "gt", "label_thr": None}
# What --labels predicted's labels depend on: the settings record of their folder (runs that
# differ only in --thr, CRF ... share it; a different checkpoint or threshold is refused).
LABEL_FLAGS = ("dataset", "weights", "network", "scales", "amp", "labels", "label_thr")
# In every output folder: the result flags and the identity of the weights (utils/provenance.py),
# so that a checkpoint retrained under the same name is never taken for the one that made them
SETTINGS_FILE = provenance.RECORD_NAME
LABEL_SOURCES = ("gt", "predicted")
# --labels predicted: a class is in the image when sigmoid(score) >= this. Chosen on the demo's
# val split with its small_eps classifier: the best pseudo-mask mIoU of 0.1..0.9 (57.80, against
# 58.06 with the true labels) and within 0.001 of the best label F1 (docs/custom-data.md,
# "Images without labels").
DEFAULT_LABEL_THR = 0.4
PREDICTED_DIR, PREDICTED_FILE, SCORES_FILE = ("predicted_labels", "predicted_labels.txt",
                                              "predicted_scores.csv")
MIN_SCALE, MAX_SCALE = 0.05, 8.0


def get_args_parser():
    p = parent_parser("EPS CAM / pseudo-mask inference")
    g = p.add_argument_group("published infer.py flags (shown hyphenated; the published "
                             "spellings are aliases)")
    flags.add_dataset(g, DATASETS)
    add_flag(g, "--infer-list", type=str, default=None,
             help="id list file or split name (default: the dataset's published list, "
                  "voc12/coco 'train', as in the published scripts)")
    flags.add_data_root(g, "--img-root", "--img_root", dest="img_root",
                        help="dataset root or its image folder (VOC: .../JPEGImages as "
                             "published); published spelling: --img_root")
    g.add_argument("--network", type=str, default=None,
                   help="network name, e.g. network.resnet38_eps or resnet38_cls (default: the "
                        "one recorded in the checkpoint, else the one its shapes fit)")
    g.add_argument("--weights", type=Path, required=True,
                   help="trained weights (.pth), e.g. the released checkpoint_cls.pth")
    g.add_argument("--thr", type=float, default=camlib.DEFAULT_THR,
                   help="constant background score of the pseudo-masks, in [0, 1] (paper: 0.20)")
    add_flag(g, "--cam-dir", "--cam_npy", type=Path, default=None,
             help="write <id>.npz CAMs here (keys, cams[, bg]; published: --cam_npy, pickled "
                  ".npy dicts)")
    add_flag(g, "--png-dir", "--cam_png", type=Path, default=None,
             help="write <id>.png pseudo-masks here (palette PNG, 0..C; published: --cam_png)")
    g.add_argument("--crf", type=Path, default=None,
                   help="write CRF-refined pseudo-masks here (not used for the published numbers)")
    add_flag(g, "--crf-alpha", type=float, nargs="+", default=[4],
             help="CRF background exponent(s): bg = (1 - max cam)^alpha (psa: 4 and 32)")
    add_flag(g, "--crf-t", type=int, nargs="+", default=[10],
             help="CRF mean-field iterations (psa/DeepLab: 10)")
    add_flag(g, "--n-gpus", type=int, default=None,
             help="accepted for compatibility and ignored: launch with torchrun instead")
    add_flag(g, "--n-processes-per-gpu", type=int, nargs="*", default=None,
             help="accepted for compatibility and ignored: launch with torchrun instead")

    g = p.add_argument_group("image labels")
    g.add_argument("--labels", type=str, default="gt", choices=LABEL_SOURCES,
                   help="which classes' CAMs make the pseudo-mask: gt = image_labels.txt (the "
                        "published behaviour); predicted = the classifier's own multi-label "
                        "prediction (images without labels; no image_labels.txt needed), "
                        "written to predicted_labels.txt beside the output folders (in their "
                        "parent; in --run-dir when given)")
    add_flag(g, "--label-thr", type=float, default=DEFAULT_LABEL_THR,
             help=f"--labels predicted: a class is present when its sigmoid score reaches this "
                  f"(at least the top class is kept); default {DEFAULT_LABEL_THR}, chosen on the "
                  f"demo's val split (docs/custom-data.md)")

    g = p.add_argument_group("outputs and resume")
    g.add_argument("--vis-dir", type=Path, default=None,
                   help="write overlays (image, pseudo-mask, per-class CAMs) here")
    g.add_argument("--vis-num", type=int, default=20,
                   help="overlays for the first N ids of the list (default 20)")
    g.add_argument("--crf-params", type=str, default="psa", choices=sorted(CRF_PRESETS),
                   help="CRF pairwise parameters: psa (3/3, 80/13/10; EPS infer.py) or deeplab "
                        "(4/67/3/3/1; EPS paper comparison)")
    g.add_argument("--bg-from-eps", action=argparse.BooleanOptionalAction, default=False,
                   help="deviation: background score = mean background probability of the head "
                        "over the views instead of the constant --thr (heads with a background "
                        "map, e.g. eps; paper: off)")
    g.add_argument("--save-bg", action=argparse.BooleanOptionalAction, default=False,
                   help="also store the background map in the npz (on with --bg-from-eps)")
    flags.add_overwrite(g, "recompute ids whose outputs already exist (default: skip them = resume)")
    g.add_argument("--run-dir", type=Path, default=None,
                   help="where args.json / env.json / log.txt go (default: the first output folder)")

    g = p.add_argument_group("data, speed and devices")
    flags.add_metadata_dir(g)
    g.add_argument("--scales", type=float, nargs="+", default=list(INFER_SCALES),
                   help=f"inference scales in [{MIN_SCALE}, {MAX_SCALE}] (paper: 0.5 1.0 1.5 2.0), "
                        f"each also flipped")
    flags.add_skip_missing(g, "image")
    flags.add_check_data(g, when="before any output folder is made")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="batched flip pairs + feature-resolution sums (same numbers, faster); "
                        "--no-fast runs the published one-view-at-a-time loop")
    g.add_argument("--batch-views", type=str, default="auto", choices=["auto", "on", "off"],
                   help="fast path: run an image and its flip as one batch (auto: on for CUDA, "
                        "off for the CPU, where it measured slower)")
    flags.add_channels_last(g, True, "channels_last memory format in the fast path (faster "
                                     "convolutions)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path on the CPU: an inference-only copy of the network with its "
                        "conv-BN pairs folded (network/cpu/), run as the Winograd graph "
                        "(--winograd) or as a frozen TorchScript graph with pre-packed oneDNN "
                        "weights (--no-winograd); CAMs equal within 2.1e-6 (docs/inference.md)")
    g.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=True,
                   help="with --fuse on the CPU: 3x3 convs with >= 256 input channels as Winograd "
                        "F(2x2,3x3) (2.25x fewer multiply-adds), the other convs with pre-packed "
                        "oneDNN weights; same function, CAMs within 2.1e-6, 1.5-1.7x less CPU time "
                        "per VOC image than --no-fast on 2 threads, about 0.8 GB more memory at "
                        "scale 2 (--no-winograd: direct convolutions)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="float16 autocast on CUDA (changes CAMs slightly; ignored on CPU)")
    flags.add_num_workers(g, 2, "DataLoader workers that decode and resize images")
    g.add_argument("--writer-threads", type=int, default=2,
                   help="threads (processes with --crf) that compress and write outputs and run "
                        "the CRF while the network works on the next image")
    flags.add_device(g)
    dist.add_dist_args(g)
    return p


def check_args(args) -> None:
    """Every flag value, before any file is read or written."""
    problems = []
    if not (math.isfinite(args.thr) and 0.0 <= args.thr <= 1.0):
        problems.append(f"--thr {args.thr} is outside [0, 1] (the background score competes with "
                        f"CAMs normalised to [0, 1]; paper: 0.20)")
    bad = [s for s in args.scales if not (math.isfinite(s) and MIN_SCALE <= s <= MAX_SCALE)]
    if bad:
        problems.append(f"--scales {' '.join(map(str, bad))}: each scale must be in "
                        f"[{MIN_SCALE}, {MAX_SCALE}] (paper: 0.5 1.0 1.5 2.0)")
    for flag, value, low in (("--num-workers", args.num_workers, 0),
                             ("--writer-threads", args.writer_threads, 1),
                             ("--vis-num", args.vis_num, 0)):
        if value < low:
            problems.append(f"{flag} {value} must be >= {low}")
    if any(t < 1 for t in args.crf_t) or not all(0 < a < math.inf for a in args.crf_alpha):
        problems.append("--crf_t must be >= 1 and --crf_alpha a finite number > 0")
    if args.network is not None:
        try:
            normalize_network_name(args.network)
        except KeyError:  # the registry's KeyError reached the user as a traceback
            problems.append(f"unknown --network {args.network!r}; choose one of "
                            f"{sorted(NETWORKS)}, or leave it out to use the checkpoint's own")
    if not args.dist_timeout > 0:
        problems.append("--dist-timeout must be positive")
    if not (math.isfinite(args.label_thr) and 0.0 < args.label_thr < 1.0):
        problems.append(f"--label-thr {args.label_thr} must be in (0, 1) (a sigmoid score)")
    if problems:
        raise InferError("; ".join(problems))


def check_inputs(args, info) -> None:
    """Every input at once (images, weights, image labels), each with where to get it."""
    from data.downloads import DOWNLOADS, hint
    problems = []
    if not Path(args.img_root).is_dir():
        key = f"{info.name}_images"
        problems.append(f"--img_root {args.img_root}: folder not found"
                        + (f" ({hint(key)})" if key in DOWNLOADS else ""))
    if not args.weights.is_file():
        problems.append(f"--weights {args.weights}: file not found (train.py's checkpoint_cls.pth, "
                        f"or {hint('released')})")
    try:
        if args.labels == "gt":
            info.image_labels
    except MetadataError as e:
        problems.append(f"{e}: CAMs are masked by the image labels; create image_labels.txt "
                        f"(tools/make_cls_labels.py), pass --metadata-dir, or use the "
                        f"classifier's own prediction (--labels predicted)")
    if problems:
        raise InferError(f"{len(problems)} input(s) missing: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# CAMs of one image: the published loop and the fast path
# --------------------------------------------------------------------------------------------
def cams_reference(model: InferenceModel, images: Sequence[torch.Tensor], label: torch.Tensor,
                   size: Tuple[int, int]):
    """The published computation: 8 forward passes of batch 1, each view upsampled on its own.
    Returns (keys, cams (K,H,W), bg (H,W) or None) on the model's device."""
    label = label.to(model.device)

    def views():
        for img in images:
            x = img.to(model.device)[None]
            for flipped in (False, True):
                yield model.forward_cam(x.flip(-1) if flipped else x)[0], flipped

    sum_fg, sum_bg, n = camlib.combine_views_reference(views(), size, label, model.head)
    return camlib.finalize(sum_fg, sum_bg, n, label)


def cams_fast(model: InferenceModel, images: Sequence[torch.Tensor], label: torch.Tensor,
              size: Tuple[int, int]):
    """Same numbers as :func:`cams_reference`, less work: each flip pair is summed at feature
    resolution and only the present classes are upsampled (network/cam.py); the model decides
    whether an image and its flip run as one batch (network/inference.py)."""
    label = label.to(model.device)
    keys = camlib.present_classes(label)
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for img in images:  # scales of equal size share a batch
        groups.setdefault(tuple(img.shape), []).append(img)
    sum_fg, sum_bg = None, None
    for imgs in groups.values():
        x = torch.stack([i.to(model.device, non_blocking=True) for i in imgs])
        batch = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # [img0, flip(img0), img1, ...]
        raw = model.forward_views(batch)
        for pair in raw.unflatten(0, (len(imgs), 2)):
            fg, bg = camlib.combine_flip_pair(pair, size, keys, label, model.head)
            sum_fg = fg if sum_fg is None else sum_fg + fg
            if bg is not None:
                sum_bg = bg if sum_bg is None else sum_bg + bg
    return camlib.finalize(sum_fg, sum_bg, 2 * len(images), label, keys=keys)


# --------------------------------------------------------------------------------------------
# Images without labels: the classifier's own prediction (--labels predicted)
# --------------------------------------------------------------------------------------------
def labels_from_scores(probs: torch.Tensor, thr: float) -> torch.Tensor:
    """float32 (C,) multi-hot of the classes whose probability reaches ``thr``; when none does,
    the top class alone (weak supervision assumes >= 1 class per image, and an image with no
    class would get an all-background mask)."""
    probs = probs.float()
    label = (probs >= thr).float()
    if not label.any():
        label[int(torch.argmax(probs))] = 1.0
    return label


def make_scorer(model: torch.nn.Module, device: torch.device, scales: Sequence[float],
                thr: float):
    """item -> (label (C,), probabilities (C,)): the head's class_scores of the unflipped view at
    the scale nearest 1 (the view closest to how the classifier was trained), sigmoid, then
    :func:`labels_from_scores`."""
    k = int(np.argmin([abs(float(sc) - 1.0) for sc in scales]))

    def score(item):
        x = item["images"][k].to(device)[None]
        probs = torch.sigmoid(model.class_scores(x).float())[0].cpu()
        return labels_from_scores(probs, thr), probs
    return score


def given_folders(args) -> List[Path]:
    """The output folders as the flags give them (--crf before its a<alpha>_t<t> sub-folders),
    first one first: it holds the run records when --run-dir is not given."""
    return [d for d in (args.png_dir, args.cam_dir, args.crf, args.vis_dir) if d is not None]


def labels_home(args) -> Path:
    """Where --labels predicted writes the labels it used: --run-dir when given, else beside
    the output folders (the first one's parent), so that no folder of per-image results holds
    anything but those results (docs/inference.md)."""
    return args.run_dir if args.run_dir is not None else given_folders(args)[0].parent


class PredictedLabels:
    """The labels --labels predicted used. One record per image, ``<dir>/<id>.txt`` (its
    image_labels.txt line, then ``# scores`` with the C probabilities), written atomically by
    the rank that made the image: ranks never write the same file. Once every id of the list
    has one, the combined ``predicted_labels.txt`` and ``predicted_scores.csv`` are written
    (atomically, identical whichever rank writes them: the last rank to finish always sees every
    record, and rank 0 writes them after its wait across nodes)."""

    def __init__(self, run_dir: Path, class_names: Sequence[str], thr: float, weights):
        self.dir = Path(run_dir) / PREDICTED_DIR
        self.combined = Path(run_dir) / PREDICTED_FILE
        self.scores_csv = Path(run_dir) / SCORES_FILE
        self.class_names, self.thr, self.weights = list(class_names), thr, weights

    def path(self, img_id: str) -> Path:
        return self.dir / f"{img_id}.txt"

    def write(self, img_id: str, label: np.ndarray, probs: np.ndarray) -> None:
        classes = " ".join(str(int(c)) for c in np.flatnonzero(np.asarray(label) > 0.5))
        scores = " ".join(f"{float(v):.6f}" for v in np.asarray(probs))
        atomic_write_text(self.path(img_id), f"{img_id} {classes}\n# scores {scores}\n")

    def read(self, img_id: str) -> Tuple[str, str]:
        """(the image_labels.txt line, the scores) of one record."""
        line, scores = self.path(img_id).read_text(encoding="utf-8").splitlines()[:2]
        return line, scores.split(maxsplit=2)[2]

    def merge(self, ids: Sequence[str]) -> bool:
        """Write the combined files when every id has a record; False when some are missing."""
        if not all(self.path(i).is_file() for i in ids):
            return False
        rows = [self.read(i) for i in ids]
        header = (f"# labels predicted by {self.weights}: classes whose sigmoid score >= "
                  f"{self.thr} (else the top class); infer.py --labels predicted\n"
                  f"# <id> <0-based class indices> (0={self.class_names[0]} ... "
                  f"{len(self.class_names) - 1}={self.class_names[-1]})\n")
        atomic_write_text(self.combined, header + "".join(f"{line}\n" for line, _ in rows))
        csv = "id," + ",".join(self.class_names) + "\n" + "".join(
            f"{i}," + ",".join(scores.split()) + "\n" for i, (_, scores) in zip(ids, rows))
        atomic_write_text(self.scores_csv, csv)
        return True


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def crf_dirs(crf_root: Optional[Path], alphas: Sequence[float],
             ts: Sequence[int]) -> Dict[Tuple[float, int], Path]:
    """One folder per (alpha, t): the --crf folder itself for one pair, sub-folders a<alpha>_t<t>
    when several are given (psa ran alpha 4 and 32 side by side)."""
    if crf_root is None:
        return {}
    pairs = [(float(a), int(t)) for a in alphas for t in ts]
    if len(pairs) == 1:
        return {pairs[0]: crf_root}
    return {(a, t): crf_root / f"a{a:g}_t{t}" for a, t in pairs}


class Outputs:
    """Paths of every output of one id, the completeness check used for resume, and the writers."""

    def __init__(self, args, class_names: Sequence[str], vis_ids: set,
                 labels: Optional[PredictedLabels] = None):
        self.cam_dir, self.png_dir, self.vis_dir = args.cam_dir, args.png_dir, args.vis_dir
        self.labels = labels
        self.crf = crf_dirs(args.crf, args.crf_alpha, args.crf_t)
        self.crf_params = args.crf_params
        self.save_bg = args.save_bg or args.bg_from_eps
        self.class_names = list(class_names)
        self.vis_ids = vis_ids

    @property
    def needs_image(self) -> bool:
        return bool(self.crf) or (self.vis_dir is not None and bool(self.vis_ids))

    def folders(self) -> List[Path]:
        return [d for d in (self.png_dir, self.cam_dir, *self.crf.values(), self.vis_dir) if d is not None]

    def paths(self, img_id: str) -> List[Path]:
        out = []
        if self.cam_dir is not None:
            out.append(self.cam_dir / f"{img_id}.npz")
        if self.png_dir is not None:
            out.append(self.png_dir / f"{img_id}.png")
        out += [d / f"{img_id}.png" for d in self.crf.values()]
        if self.vis_dir is not None and img_id in self.vis_ids:
            out.append(self.vis_dir / f"{img_id}.png")
        if self.labels is not None:
            out.append(self.labels.path(img_id))
        return out

    def complete(self, img_id: str) -> bool:
        # Every writer is atomic (temporary file + rename), so an existing file is a whole file.
        return all(p.is_file() for p in self.paths(img_id))

    def write(self, img_id: str, keys: np.ndarray, cams: np.ndarray, bg: Optional[np.ndarray],
              mask: np.ndarray, image: Optional[np.ndarray],
              predicted: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> None:
        """Write all outputs of one image (runs in a writer thread or process); ``predicted``:
        (label, probabilities) of --labels predicted, whose record is written last."""
        if self.cam_dir is not None:
            arrays = dict(keys=keys.astype(np.int64), cams=cams.astype(np.float32))
            if bg is not None and self.save_bg:
                arrays["bg"] = bg.astype(np.float32)
            save_npz(self.cam_dir / f"{img_id}.npz", **arrays)
        if self.png_dir is not None:
            save_label_png(self.png_dir / f"{img_id}.png", mask)
        for (alpha, t), folder in self.crf.items():
            probs = cam_crf(image, cams, alpha=alpha, n_iters=t, preset=self.crf_params)
            save_label_png(folder / f"{img_id}.png", crf_mask(probs, keys))
        if self.vis_dir is not None and img_id in self.vis_ids:
            save_cam_overview(self.vis_dir / f"{img_id}.png", image, mask, keys.tolist(), cams,
                              self.class_names, bg=bg, title=img_id)
        if self.labels is not None and predicted is not None:
            self.labels.write(img_id, *predicted)


def result_settings(args) -> Dict:
    out = {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items()
           if k in RESULT_FLAGS}
    if out.get("labels", "gt") == "gt":
        out["label_thr"] = None  # no effect on ground-truth labels: not a different setting
    return out


def has_results(folder: Path, suffixes: Tuple[str, ...] = (".png", ".npz")) -> bool:
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        return any(e.name.endswith(suffixes) and not e.name.startswith(".") for e in it)


def recorded_folders(outputs: Outputs) -> List[Tuple[Path, Sequence[str], Tuple[str, ...], str]]:
    """(folder, the flags its results depend on, its results' suffixes, the other way out of a
    refusal) of every folder that records its settings: the output folders, and the per-image
    records of --labels predicted (shared by runs beside each other that predict the same)."""
    out = [(f, RESULT_FLAGS, (".png", ".npz"), "choose another folder") for f in outputs.folders()]
    if outputs.labels is not None:
        out.append((outputs.labels.dir, LABEL_FLAGS, (".txt",),
                    "give this run its own --run-dir (the labels go there)"))
    return out


def output_folders(args) -> List[Path]:
    """Every output folder of the flags (Outputs.folders without building the writer)."""
    return [d for d in (args.png_dir, args.cam_dir, *crf_dirs(args.crf, args.crf_alpha,
                                                               args.crf_t).values(), args.vis_dir)
            if d is not None]


def weights_inputs(args, folders: Sequence[Path]) -> Dict[str, Dict]:
    """{weights path: identity} for the records; the sha256 a folder recorded is reused while
    the file's size and modification time are unchanged (no 1 s hash on every rerun)."""
    key = str(Path(args.weights).resolve())
    known = None
    for folder in folders:
        known = ((provenance.read_record(Path(folder) / SETTINGS_FILE) or {}).get("inputs")
                 or {}).get(key)
        if known:
            break
    return {key: provenance.file_identity(args.weights, known)}


def stale_weights(args, folders: Sequence[Path], weights_made_earlier: bool = False) -> Optional[str]:
    """A problem line when an output folder holds results of other weights than --weights now:
    a checkpoint retrained or replaced under the same name (train.py --resume --extend), or one
    an earlier stage of the same pipeline is about to write. None with --overwrite."""
    if args.overwrite:
        return None
    for folder in folders:
        why = has_results(Path(folder)) and provenance.weights_changed(folder, args.weights,
                                                                       weights_made_earlier)
        if why:
            return (f"{folder} holds results {why}; pass --overwrite (INFER_ARGS for the "
                    f"scripts) to recompute every image, or delete {folder}")
    return None


def check_settings(outputs: Outputs, args) -> None:
    """Refuse to add results to ANY output folder that holds results made with other
    result-affecting flags or by other weights (each folder records its own in SETTINGS_FILE)."""
    if args.overwrite:
        return
    problem = stale_weights(args, outputs.folders())
    if problem:
        raise InferError(problem)
    settings = result_settings(args)
    for folder, keys, suffixes, way_out in recorded_folders(outputs):
        if not has_results(folder, suffixes):
            continue
        record = folder / SETTINGS_FILE
        try:
            prev = json.loads(record.read_text())
        except (OSError, ValueError):
            raise InferError(f"{folder} already holds results but no record of their settings "
                             f"({record}); pass --overwrite to recompute every image, or "
                             f"{way_out}") from None
        prev = {k: prev.get(k, RESULT_DEFAULTS.get(k)) for k in keys}
        diff = {k: (prev.get(k), settings.get(k)) for k in keys if prev.get(k) != settings.get(k)}
        if diff:
            text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise InferError(f"{folder} holds results made with other settings ({text}); rerun "
                             f"with the same flags to resume, pass --overwrite to recompute every "
                             f"image, or {way_out}")


def record_settings(outputs: Outputs, args, inputs: Dict[str, Dict]) -> None:
    settings = result_settings(args)
    for folder, keys, _, _ in recorded_folders(outputs):
        record = dict({k: settings.get(k) for k in keys}, inputs=inputs)
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        atomic_write_text(folder / SETTINGS_FILE, text)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def _identity(item):
    return item


def make_cams(model: InferenceModel, items: Iterable[dict], outputs: Outputs, *, thr: float,
              bg_from_eps: bool, total: int, writer_threads: int = 2, progress: bool = True,
              scorer=None) -> int:
    """Run the prepared model over the dataset items and write every output; returns the number
    of images. Writers run beside the network (a bounded queue keeps memory flat). Items without
    a label (--labels predicted) get theirs from ``scorer`` (:func:`make_scorer`)."""
    pending: List[Future] = []
    n = 0
    cams_of = cams_fast if model.fast else cams_reference
    bar = Progress(total, "cams", enabled=progress, unit="img")
    with executor(writer_threads, processes=bool(outputs.crf)) as pool, torch.inference_mode():
        for item in items:
            size = tuple(int(s) for s in item["size"])
            label, predicted = item["label"], None
            if label is None:
                label, probs = scorer(item)
                predicted = (label.numpy(), probs.numpy())
            keys, cams, bg = cams_of(model, item["images"], label, size)
            mask = camlib.pseudo_mask(keys, cams, thr=thr, bg=bg if bg_from_eps else None)
            result = (item["id"], keys.cpu().numpy(), cams.cpu().numpy(),
                      None if bg is None else bg.cpu().numpy(), mask.cpu().numpy(), item.get("image"),
                      predicted)
            pending.append(pool.submit(outputs.write, *result))
            # Bounded queue: re-raise writer errors early and cap the memory held by results.
            while len(pending) > 2 * max(1, writer_threads) or (pending and pending[0].done()):
                pending.pop(0).result()
            n += 1
            bar.update(1)
        for f in pending:
            f.result()
    bar.close()
    return n


def main(args):
    # 1. flags, device, dataset, checkpoint, outputs: all checked before anything is written
    check_args(args)
    outputs_given = given_folders(args)
    if not outputs_given:
        raise InferError("nothing to write: pass at least one of --png-dir (--cam_png), "
                         "--cam-dir (--cam_npy), --crf or --vis-dir")
    device = resolve_device(args.device, dist.get_local_rank())
    numerics = configure_numerics(device)
    if args.amp and device.type != "cuda":
        logger.info("--amp is ignored on the CPU (float32 keeps the published numbers)")
        args.amp = False
    # No process group: the ranks share nothing but the list and the folders (utils/dist.py)
    rank, world = dist.launched_rank(), dist.launched_world_size()
    if args.overwrite and dist.spans_nodes():
        # rank 0 waits for the other nodes' files by their presence: old ones would satisfy it
        raise InferError("--overwrite cannot be used across several nodes (rank 0 could not tell "
                         "the other nodes' new outputs from the old ones): delete the output "
                         "folders, or write to new ones, and run without --overwrite")
    if args.n_gpus is not None or args.n_processes_per_gpu is not None:
        logger.info("--n_gpus / --n_processes_per_gpu are ignored: for several GPUs or processes "
                    "launch with torchrun --nproc_per_node N infer.py ...")
    check_shared_memory(args.num_workers)
    run_dir = args.run_dir or outputs_given[0]
    predict = args.labels == "predicted"
    for flag, folder in (("--png-dir", args.png_dir), ("--cam-dir", args.cam_dir),
                         ("--crf", args.crf), ("--vis-dir", args.vis_dir), ("--run-dir", run_dir),
                         ("--labels predicted", labels_home(args) if predict else None)):
        if folder is not None:
            check_writable(folder, flag)
    if args.crf is not None:
        from utils.crf import _densecrf
        _densecrf()  # fail now, not after the network pass, when pydensecrf is missing

    args.weights = args.weights.resolve()  # args.json records where the weights came from
    check_data_root(args.img_root, "--img_root")
    info = get_dataset(args.dataset, args.metadata_dir, args.img_root)
    check_inputs(args, info)
    # Released checkpoints carry no network record: for the registered datasets (20 / 80
    # classes) the shapes decide; on a custom dataset an ambiguous file needs --network.
    model, found = load_network(args.weights, info.num_classes, args.network,
                                ambiguous_ok=info.spec.metadata_dir is not None)
    args.network = found.network
    if args.bg_from_eps and not model.has_background:
        raise InferError(f"--bg-from-eps needs a head with a background map (eps); "
                         f"{found.network} has none")
    if predict and type(model).class_scores is Head.class_scores:
        raise InferError(f"--labels predicted needs the head's class scores, and the "
                         f"{model.head_type!r} head of {found.network} declares no "
                         f"class_scores(x) (network/heads.py); use --labels gt")
    ids = info.read_ids(args.infer_list or info.train_defaults.get("infer_list", "train"))
    vis_ids = set(ids[:args.vis_num]) if args.vis_dir is not None else set()
    labels = (PredictedLabels(labels_home(args), info.class_names, args.label_thr, args.weights)
              if predict else None)
    outputs = Outputs(args, info.class_names, vis_ids, labels)
    check_settings(outputs, args)
    inputs = weights_inputs(args, outputs.folders())
    mine = ids[rank::world]  # interleaved split: every rank gets a similar mix of image sizes
    todo = mine if args.overwrite else [i for i in mine if not outputs.complete(i)]
    dataset = (InferDataset(info, args.img_root, todo, scales=args.scales,
                            skip_missing=args.skip_missing, return_image=outputs.needs_image,
                            with_labels=not predict)
               if todo else None)
    if dataset is not None and args.check_data:
        check_files(dataset.ids, dataset.image_paths)

    # 2. outputs: folders, settings records, run records. Temporary files a killed run left
    #    go; other ranks or jobs may be writing here now, so only those older than
    #    utils.io.STALE_AFTER_S. EVERY rank records the (identical) settings, atomically, before
    #    it writes a result: with no barrier between the ranks, a folder that holds a result
    #    then always holds its record too, whichever rank checks it and when.
    if rank == 0:
        for folder in outputs.folders() + [run_dir] + ([labels.dir] if labels else []):
            remove_stale_temps(folder)
    record_settings(outputs, args, inputs)
    setup_logging(run_dir / "log.txt")
    write_run_info(run_dir, args, numerics=numerics)
    logger.info("network %s (%s) from %s", found.network, found, args.weights)
    logger.info("%d ids in the list; rank %d/%d has %d, %d already complete%s", len(ids), rank,
                world, len(mine), len(mine) - len(todo),
                "" if args.overwrite else " (skipped; --overwrite recomputes them)")

    # 3. the network pass; ranks finish independently (no collective after uneven work)
    if dataset is not None:
        logger.info("%s", dataset)
        speed = SpeedOptions(fast=args.fast, fuse=args.fuse, winograd=args.winograd,
                             channels_last=args.channels_last, amp=args.amp,
                             batch_views={"auto": None, "on": True, "off": False}[args.batch_views])
        if OWN_PROCESS and device.type == "cpu" and args.fast and args.fuse and args.winograd:
            # the default CPU path: activations reused from the heap instead of page-faulted in
            # anew per layer (network/cpu/memory.py: ~5% less time, ~1 GB more peak memory;
            # --no-winograd stays the low-memory path). Process-wide and lasting, so only when
            # infer.py is the program, never when a caller (a test, a notebook) runs main()
            from network.cpu.memory import keep_freed_memory
            keep_freed_memory()
        prepared = prepare_for_inference(model, device, speed)
        logger.info("inference model on %s: %s", device, prepared.description)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=args.num_workers,
            pin_memory=pin_memory(device), collate_fn=_identity,
            worker_init_fn=loader_worker_init() if args.num_workers > 0 else None)
        t0 = time.time()
        scorer = make_scorer(model, device, args.scales, args.label_thr) if predict else None
        n = make_cams(prepared, loader, outputs, thr=args.thr, bg_from_eps=args.bg_from_eps,
                      total=len(dataset), writer_threads=args.writer_threads,
                      progress=rank == 0, scorer=scorer)
        dt = time.time() - t0
        logger.info("rank %d: %d images in %.1f s (%.3f s/image)", rank, n, dt, dt / max(n, 1))
    present = None
    if dist.spans_nodes() and rank == 0:
        # 4. rank 0 returns when the whole list is written, whichever node wrote it (on one
        #    node, torchrun itself returns only when every rank has finished)
        present = ids if not args.skip_missing else InferDataset(
            info, args.img_root, ids, skip_missing=True, with_labels=False).ids
        dist.wait_for_outputs(present, outputs.complete, what="images' outputs",
                              timeout_s=args.dist_timeout)
    if labels is not None:
        # 5. the combined label files, once every id has its record (see PredictedLabels)
        if present is None:
            present = ids if not args.skip_missing else InferDataset(
                info, args.img_root, ids, skip_missing=True, with_labels=False).ids
        if labels.merge(present):
            logger.info("labels predicted for %d images (sigmoid >= %g, else the top class) -> "
                        "%s, %s", len(present), args.label_thr, labels.combined,
                        labels.scores_csv)
        else:
            logger.info("rank %d: other ranks are still writing; the last to finish writes %s",
                        rank, labels.combined)
    logger.info("rank %d done; outputs: %s", rank, ", ".join(str(d) for d in outputs.folders()))


if __name__ == "__main__":
    OWN_PROCESS = True
    sys.exit(run_cli(get_args_parser, main, __doc__))
