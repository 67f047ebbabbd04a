"""Bad input and faults, through the real entry points.

A table of cases (``CASES``): each gives a bad input to train.py, infer.py, evaluate.py,
train_seg.py, infer_seg.py, tools/check_dataset.py or tools/convert_resnet38.py and asserts what
a user must see: a non-zero exit, exactly one ``<prog>: error: <message>`` line on stderr that
names the file or flag and says the fix, no "Traceback" anywhere, and nothing written (the
case's output path does not exist afterwards: no run directory, no empty png/ folder, no
checkpoint). Most cases call ``run_cli`` in this process (the same code path as the command,
without 3 s of imports); the ``SUBPROCESS`` ones, at least one per entry point, run the script
as a command, started together at the beginning of the module so that they overlap with the
rest. Legitimate input (a repeated list id, 16-bit maps and images) must give exactly the
result of its clean twin. The faults: a kill -9 of ``infer.py --crf`` leaves no process behind,
and a temporary file left by a killed run is removed at the next start.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import infer
import infer_seg
import train
import train_seg
from network import build_network
from network.deeplab import build_deeplab
from network.weights import record_network
from tests.onnx_models import classifier_onnx, saliency_onnx
from tools import check_dataset, convert_resnet38, eval_saliency, make_saliency
from utils.cli import run_cli
from utils.device import cuda_problem
from utils.io import load_npz, save_label_png

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
MODULES = {"train.py": train, "infer.py": infer, "evaluate.py": evaluate,
           "train_seg.py": train_seg, "infer_seg.py": infer_seg,
           "tools/check_dataset.py": check_dataset, "tools/convert_resnet38.py": convert_resnet38,
           "tools/make_saliency.py": make_saliency, "tools/eval_saliency.py": eval_saliency}
COLORS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))
N_IMAGES = 6


# ------------------------------------------------------------------------------------------------
# generated data, shared by every case
# ------------------------------------------------------------------------------------------------
def make_data(root: Path) -> Path:
    """A 'custom' VOC-layout root: 6 images of 40-50 x 32 px with coloured squares (3 classes),
    saliency maps, GT masks (SegmentationClass), pseudo-masks (pseudo/), labels and lists."""
    rng = np.random.RandomState(0)
    for d in ("JPEGImages", "SALImages", "SegmentationClass", "pseudo"):
        (root / d).mkdir(parents=True)
    lines = []
    for i in range(N_IMAGES):
        w, h = 40 + 2 * i, 32
        img = rng.randint(60, 160, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        present = sorted(rng.choice(3, size=1 + i % 2, replace=False).tolist())
        for c in present:
            y, x = int(rng.randint(0, h - 12)), int(rng.randint(0, w - 12))
            img[y:y + 12, x:x + 12] = COLORS[c]
            mask[y:y + 12, x:x + 12] = c + 1
        img_id = f"img_{i:03d}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{img_id}.jpg", quality=95)
        Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L").save(
            root / "SALImages" / f"{img_id}.png")
        save_label_png(root / "SegmentationClass" / f"{img_id}.png", mask)
        save_label_png(root / "pseudo" / f"{img_id}.png", mask)
        lines.append(" ".join([img_id] + [str(c) for c in present]))
    (root / "labels.txt").write_text("0 background\n1 red\n2 green\n3 blue\n")
    (root / "image_labels.txt").write_text("\n".join(lines) + "\n")
    ids = "".join(line.split()[0] + "\n" for line in lines)
    for name in ("train", "train_aug"):
        (root / f"{name}.txt").write_text(ids)
    (root / "val.txt").write_text("".join(ids.splitlines(keepends=True)[:3]))
    return root


def params_file(arrays: Dict[str, np.ndarray]) -> bytes:
    """An MXNet .params file (NDArray list, V2 dense float32 records), written from the format
    (network/mxnet_params.py): list magic, reserved, count, records, name count, names."""
    out = struct.pack("<QQQ", 0x112, 0, len(arrays))
    for a in arrays.values():
        a = np.asarray(a, np.float32)
        out += (struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack("<i", a.ndim)
                + struct.pack(f"<{a.ndim}q", *a.shape) + struct.pack("<iii", 1, 0, 0) + a.tobytes())
    out += struct.pack("<Q", len(arrays))
    for name in arrays:
        out += struct.pack("<Q", len(name)) + name.encode()
    return out


class Pickled:
    """Pickles as a call of print: a .pth holding it must be refused, never run."""

    def __reduce__(self):
        return print, ("this ran code from a weights file",)


@dataclass
class World:
    root: Path
    eps: Path          # small_eps for the 3 classes, network recorded (as train.py writes it)
    cls: Path          # small_cls, recorded
    voc_eps: Path      # small_eps for 20 classes without a record (as a released VOC file)
    deeplab: Path      # a deeplabv2_small checkpoint_final.pth for the 4 outputs
    done: Path         # a finished train.py run (small_cls, 2 iterations)
    seg_done: Path     # a finished train_seg.py run (1 iteration)
    cam: Path          # infer.py --cam-dir of `eps`
    text: Path         # a text file
    evil: Path         # a .pth with a pickled call
    trunc: Path        # a .params file cut short
    bad_shape: Path    # a .params file whose first shape field says 1000 dimensions
    other_params: Path  # a readable .params file that is not ResNet-38


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("bad_input")
    root = make_data(tmp / "data")
    torch.manual_seed(0)
    paths = {}
    for name in ("small_eps", "small_cls"):
        model = build_network(name, 3)
        paths[name] = tmp / f"{name}.pth"
        torch.save(record_network(model.state_dict(), model), paths[name])
    torch.save(build_network("small_eps", 20).state_dict(), tmp / "voc_eps.pth")
    (tmp / "deeplab").mkdir()
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(),
               tmp / "deeplab" / "checkpoint_final.pth")
    (tmp / "weights.txt").write_text("these are not weights\n")
    torch.save({"model": Pickled()}, tmp / "evil.pth")
    good = params_file({"arg:conv1a_weight": np.ones((4, 3, 3, 3)), "arg:fc_bias": np.zeros(4)})
    (tmp / "trunc.params").write_bytes(good[:-10])
    bad = bytearray(good)
    bad[32:36] = struct.pack("<i", 1000)  # 1st record's ndim: after header (24), magic, stype
    (tmp / "shape.params").write_bytes(bytes(bad))
    (tmp / "other.params").write_bytes(params_file({"arg:a": np.ones(3)}))
    for module, argv in ((train, train_argv(root, tmp / "runs", network="small_cls")),
                         (train_seg, seg_argv(root, tmp / "seg_done", iters=1)),
                         (infer, infer_argv(root, paths["small_eps"], "--cam-dir", tmp / "cam"))):
        closing_logs(lambda: module.main(parse(module, argv)))
    return World(root=root, eps=paths["small_eps"], cls=paths["small_cls"],
                 voc_eps=tmp / "voc_eps.pth", deeplab=tmp / "deeplab" / "checkpoint_final.pth",
                 done=tmp / "runs" / "run", seg_done=tmp / "seg_done", cam=tmp / "cam",
                 text=tmp / "weights.txt", evil=tmp / "evil.pth", trunc=tmp / "trunc.params",
                 bad_shape=tmp / "shape.params", other_params=tmp / "other.params")


def parse(module, argv):
    return argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(
        [str(a) for a in argv])


def closing_logs(fn):
    """Run an in-process stage and close the log files it opened (infer.py leaves its own open)."""
    before = set(logging.getLogger().handlers)
    try:
        return fn()
    finally:
        for h in set(logging.getLogger().handlers) - before:
            if isinstance(h, logging.FileHandler):
                logging.getLogger().removeHandler(h)
                h.close()


# ------------------------------------------------------------------------------------------------
# command lines
# ------------------------------------------------------------------------------------------------
def train_argv(root, save_root, *extra, network="small_eps", iters=2, session="run"):
    return ["--dataset", "custom", "--data_root", root, "--network", network, "--weights", "none",
            "--save_root", save_root, "--session", session, "--train_list", "train",
            "--crop_size", 32, "--resize_size", 32, 48, "--batch_size", 2, "--max_iters", iters,
            "--num_workers", 0, "--log-every", 1, "--ckpt-every", 1, "--device", "cpu", *extra]


def infer_argv(root, weights, *extra):
    return ["--dataset", "custom", "--img_root", root, "--weights", weights, "--num-workers", 0,
            "--writer-threads", 1, "--device", "cpu", *extra]


def eval_argv(root, save, *extra, pred=None):
    return ["--dataset", "custom", "--data-root", root, "--datalist", "train",
            "--pred_dir", pred if pred is not None else root / "pseudo", "--save_path", save,
            "--num-workers", 0, "--no-progress", *extra]


def seg_argv(root, run_dir, *extra, iters=2, masks=None):
    return ["--dataset", "custom", "--data_root", root, "--mask-dir",
            masks if masks is not None else root / "pseudo", "--arch", "deeplabv2_small",
            "--batch-size", 2, "--iter-size", 1, "--crop-size", 32, "--num-workers", 0,
            "--save-every", 0, "--max-iters", iters, "--run-dir", run_dir, "--device", "cpu",
            *extra]


def iseg_argv(root, weights, out, *extra):
    return ["--dataset", "custom", "--data_root", root, "--weights", weights, "--out-dir", out,
            "--list", "val", "--num-workers", 0, "--device", "cpu", *extra]


def _flag_span(argv, flag):
    i = argv.index(flag)
    j = i + 1
    while j < len(argv) and not str(argv[j]).startswith("--"):
        j += 1
    return i, j


def replace_flag(argv, flag, *values):
    """argv with the values of (the first) ``flag`` replaced."""
    argv = list(argv)
    i, j = _flag_span(argv, flag)
    return argv[:i + 1] + list(values) + argv[j:]


def drop_flag(argv, flag):
    argv = list(argv)
    i, j = _flag_span(argv, flag)
    return argv[:i] + argv[j:]


@dataclass
class Ctx:
    """One case's scratch folder ``tmp`` (``src``: the generated root). ``out`` is the output
    the command is asked to create; after a failed run it must not exist, and nothing may have
    been added under ``tmp`` since ``snapshot()``. ``after`` holds further checks (e.g. files
    that must be unchanged)."""
    tmp: Path
    src: Path
    out: Path = None
    after: List[Callable[[], None]] = field(default_factory=list)
    before: set = field(default_factory=set)

    def __post_init__(self):
        self.out = self.out or self.tmp / "out"

    def root(self, name="data", edit: Optional[Callable[[Path], None]] = None) -> Path:
        """A copy of the generated root, changed by ``edit``."""
        dst = self.tmp / name
        shutil.copytree(self.src, dst)
        if edit is not None:
            edit(dst)
        return dst

    def snapshot(self) -> None:
        self.before = set(self.tmp.rglob("*"))

    def added(self) -> List[Path]:
        return sorted(set(self.tmp.rglob("*")) - self.before)

    def unwritable(self) -> Path:
        """An output path that cannot be created: below a read-only folder, or, for root (who
        may write anywhere), below an existing file."""
        if os.geteuid() == 0:
            (self.tmp / "a_file").write_text("x")
            self.out = self.tmp / "a_file" / "out"
        else:
            ro = self.tmp / "read_only"
            ro.mkdir()
            ro.chmod(0o555)
            self.out = ro / "out"
        return self.out

    def unchanged(self, folder: Path) -> None:
        """After the case, ``folder`` holds the same files with the same bytes as now."""
        def files():
            return {f: f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
        before = files()
        self.after.append(lambda: _same_files(folder, before, files()))


def _same_files(folder, before, after):
    assert sorted(after) == sorted(before), f"files added to or removed from {folder}"
    changed = [str(f) for f in before if after[f] != before[f]]
    assert not changed, f"changed: {changed}"


# ------------------------------------------------------------------------------------------------
# edits of a copied root
# ------------------------------------------------------------------------------------------------
def random_bytes_jpg(root):
    (root / "JPEGImages" / "img_002.jpg").write_bytes(np.random.RandomState(1).bytes(700))


def zero_byte_saliency(root):
    (root / "SALImages" / "img_002.png").write_bytes(b"")


def four_classes(root):
    (root / "labels.txt").write_text("0 background\n1 red\n2 green\n3 blue\n4 pink\n")


def no_image_labels(root):
    (root / "image_labels.txt").unlink()


def id_without_labels(root):
    for sub, ext in (("JPEGImages", ".jpg"), ("SALImages", ".png"), ("SegmentationClass", ".png")):
        shutil.copy(root / sub / f"img_000{ext}", root / sub / f"img_999{ext}")
    with open(root / "train.txt", "a") as f:
        f.write("img_999\n")


def empty_list(root):
    (root / "train.txt").write_text("# no ids yet\n")
    (root / "val.txt").write_text("")


def labels_malformed(root):
    (root / "labels.txt").write_text("0 background\nred\n2 green\n3 blue\n")


def labels_gap(root):
    (root / "labels.txt").write_text("0 background\n1 red\n3 blue\n")


def labels_background_only(root):
    (root / "labels.txt").write_text("0 background\n")


def conflicting_image_labels(root):
    with open(root / "image_labels.txt", "a") as f:
        f.write("img_000 0 1 2\n")


def saliency_other_aspect(root):
    Image.fromarray(np.zeros((5, 40), np.uint8), mode="L").save(root / "SALImages" / "img_003.png")


def saliency_16bit_colour(root):
    rgb = np.zeros((32, 46, 3), np.uint16)
    rgb[4:10, 4:10] = 65535
    import cv2  # PIL cannot write 16-bit colour PNGs
    cv2.imwrite(str(root / "SALImages" / "img_003.png"), rgb)


def rgb_gt(root):
    path = root / "SegmentationClass" / "img_001.png"
    Image.open(path).convert("RGB").save(path)


def rgb_pseudo(root):
    path = root / "pseudo" / "img_001.png"
    Image.open(path).convert("RGB").save(path)


def pseudo_out_of_range(root):
    path = root / "pseudo" / "img_004.png"
    m = np.array(Image.open(path))
    m[0, 0] = 9
    save_label_png(path, m)


def pseudo_wrong_size(root):
    save_label_png(root / "pseudo" / "img_002.png", np.zeros((10, 10), np.uint8))


def no_image_002(root):
    (root / "JPEGImages" / "img_002.jpg").unlink()


def no_map_002(root):
    (root / "SALImages" / "img_002.png").unlink()


def sal_argv(root, out, model, *extra):
    return ["--dataset", "custom", "--data-root", root, "--list", "train", "--out", out,
            "--model-path", model, "--workers", 1, "--threads", 1, "--no-progress", *extra]


def no_rembg():
    import importlib.util
    return None if importlib.util.find_spec("rembg") else "rembg is not installed"


def pred_wrong_size(root):
    save_label_png(root / "pseudo" / "img_001.png", np.zeros((10, 10), np.uint8))


def coco_metadata(c: Ctx) -> Path:
    """A --metadata-dir for --dataset coco (the shipped 80 class names) that lists our ids."""
    meta = c.tmp / "coco_meta"
    meta.mkdir()
    shutil.copy(REPO / "metadata" / "coco" / "labels.txt", meta / "labels.txt")
    for name in ("image_labels.txt", "train.txt", "val.txt"):
        shutil.copy(c.src / name, meta / name)
    return meta


def corrupt_cam_dir(w: World, c: Ctx) -> Path:
    """A copy of infer.py's CAM folder with one npz cut short."""
    cam = c.tmp / "cam"
    shutil.copytree(w.cam, cam)
    data = (cam / "img_003.npz").read_bytes()
    (cam / "img_003.npz").write_bytes(data[:len(data) // 2])
    return cam


def finished_run(w: World, c: Ctx) -> Path:
    """A copy of the finished train.py run; its files must stay unchanged."""
    save_root = c.tmp / "runs"
    shutil.copytree(w.done, save_root / "run")
    c.unchanged(save_root / "run")
    return save_root


# ------------------------------------------------------------------------------------------------
# the catalogue
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    script: str
    build: Callable[[World, Ctx], list]
    match: str                 # regex for the error line: the file or flag, and the fix
    subprocess: bool = False
    report: bool = False       # check_dataset's problem table (exit 1) instead of an error line
    needs: Optional[Callable[[], Optional[str]]] = None  # a reason to skip, or None


T, I, E, S, P = "train.py", "infer.py", "evaluate.py", "train_seg.py", "infer_seg.py"
C, V = "tools/check_dataset.py", "tools/convert_resnet38.py"
M, A = "tools/make_saliency.py", "tools/eval_saliency.py"
FIX_FILE = r"replace or fix these files, or remove their ids from the list"


def no_cuda():
    return None if cuda_problem() is not None else "CUDA works on this machine"


CASES = [
    # ---- train.py -------------------------------------------------------------------------
    Case("train-random-bytes-jpg-eps", T, lambda w, c: train_argv(
        c.root(edit=random_bytes_jpg), c.out),
        r"cannot read image \S+img_002\.jpg .*" + FIX_FILE),
    Case("train-random-bytes-jpg-cls", T, lambda w, c: train_argv(
        c.root(edit=random_bytes_jpg), c.out, network="small_cls"),
        r"img_002: cannot read image \S+img_002\.jpg .*" + FIX_FILE),
    Case("train-zero-byte-saliency", T, lambda w, c: train_argv(
        c.root(edit=zero_byte_saliency), c.out),
        r"cannot read saliency map \S+SALImages/img_002\.png .*" + FIX_FILE),
    Case("train-saliency-other-aspect", T, lambda w, c: train_argv(
        c.root(edit=saliency_other_aspect), c.out),
        r"img_003 \(map 40x5.*regenerate .*--stretch-saliency"),
    Case("train-saliency-16bit-colour", T, lambda w, c: train_argv(
        c.root(edit=saliency_16bit_colour), c.out),
        r"saliency map \S+img_003\.png is a 16-bit colour PNG.*save it as an 8-bit grayscale PNG"),
    Case("train-text-weights", T, lambda w, c: train_argv(w.root, c.out, "--weights", w.text),
         r"weights\.txt: not a PyTorch weights file \(it starts with text .*pass the \.pth"),
    Case("train-truncated-params", T, lambda w, c: train_argv(w.root, c.out, "--weights", w.trunc),
         r"trunc\.params: truncated: \d+ of at least \d+ bytes.*download or copy it again",
         subprocess=True),
    Case("train-params-corrupt-shape", T, lambda w, c: train_argv(
        w.root, c.out, "--weights", w.bad_shape),
        r"shape\.params: corrupt: a shape with 1000 dimensions.*download or copy it again"),
    Case("train-pickled-pth", T, lambda w, c: train_argv(w.root, c.out, "--weights", w.evil),
         r"evil\.pth: not a plain weights file: .*refused for safety.*"
         r"torch\.save\(model\.state_dict\(\), PATH\)"),
    Case("train-eps-checkpoint-for-C-on-C+1", T, lambda w, c: train_argv(
        c.root(edit=four_classes), c.out, "--weights", w.eps),
        r"--weights \S+small_eps\.pth: a small_eps checkpoint for 3 classes.*dataset's 4 classes"
        r".*Pass the ImageNet weights"),
    Case("train-dataset-coco-with-voc-checkpoint", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out, "--weights", w.voc_eps, "--metadata-dir", coco_metadata(c)),
        "--dataset", "coco"),
        r"voc_eps\.pth: fits small_cls for 21 classes.* or small_eps for 20 classes.*; but "
        r"small_eps for the dataset's 80 classes needs other shapes"),
    Case("train-resume-larger-max-iters-on-finished-run", T, lambda w, c: train_argv(
        w.root, finished_run(w, c), "--resume", network="small_cls", iters=4),
        r"finished at iteration 2; to train it further to --max_iters 4 pass --extend"),
    Case("train-resume-below-its-iteration", T, lambda w, c: train_argv(
        w.root, finished_run(w, c), "--resume", network="small_cls", iters=1),
        r"--resume \S+checkpoint_last\.pth is at iteration 2, beyond --max_iters 1; pass "
        r"--max_iters 2 or more"),
    Case("train-resume-text-file", T, lambda w, c: train_argv(w.root, c.out, "--resume", w.text),
         r"--resume \S+weights\.txt: not a PyTorch weights file.*--resume needs the "
         r"checkpoint_last\.pth that train\.py writes"),
    Case("train-resume-plain-weights", T, lambda w, c: train_argv(w.root, c.out, "--resume", w.eps),
         r"small_eps\.pth is not a train\.py checkpoint.*use --weights"),
    Case("train-resume-pickled", T, lambda w, c: train_argv(w.root, c.out, "--resume", w.evil),
         r"--resume \S+evil\.pth: not a plain weights file: .*refused for safety"),
    Case("train-missing-root", T, lambda w, c: train_argv(c.tmp / "nope", c.out),
         r"--data_root \S+nope: no such folder; pass the dataset root"),
    Case("train-missing-image-labels", T, lambda w, c: train_argv(
        c.root(edit=no_image_labels), c.out),
        r"image_labels\.txt: file not found; make it with tools/make_cls_labels\.py"),
    Case("train-id-without-labels", T, lambda w, c: train_argv(
        c.root(edit=id_without_labels), c.out),
        r"no image labels for id 'img_999'; .*remove the id from the list"),
    Case("train-conflicting-image-labels", T, lambda w, c: train_argv(
        c.root(edit=conflicting_image_labels), c.out),
        r"image_labels\.txt: id 'img_000' is on line 1 and line 7 with different classes.*"
        r"keep the right line"),
    Case("train-empty-list", T, lambda w, c: train_argv(c.root(edit=empty_list), c.out),
         r"train\.txt: the id list is empty; put one image id per line"),
    Case("train-labels-malformed", T, lambda w, c: train_argv(c.root(edit=labels_malformed), c.out),
         r"labels\.txt:2: expected '<index> <name>'.*got 'red'; write one class per line"),
    Case("train-labels-gap", T, lambda w, c: train_argv(c.root(edit=labels_gap), c.out),
         r"labels\.txt: class indices must be 0\.\.N-1 without gaps.*2 is missing; number"),
    Case("train-labels-background-only", T, lambda w, c: train_argv(
        c.root(edit=labels_background_only), c.out),
        r"labels\.txt: need background plus at least one class; add a line '1 <name>'"),
    Case("train-list-missing", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--train_list", "nolist"),
        r"id list 'nolist' not found .*pass a path or a split name"),
    Case("train-network-unknown", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--network", "resnet50_eps"),
        r"unknown --network 'resnet50_eps'; choose one of \[.*'resnet38_eps'"),
    Case("train-max-iters-negative", T, lambda w, c: train_argv(w.root, c.out, iters=-1),
         r"--max_iters must be positive"),
    Case("train-batch-size-0", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--batch_size", 0), r"--batch_size must be positive"),
    Case("train-batch-larger-than-the-list", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--batch_size", 8),
        r"the training list has 6 usable images, fewer than one batch of 8; lower --batch_size"),
    Case("train-resize-size-reversed", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--resize_size", 48, 32),
        r"--resize_size needs 0 < MIN_LONG <= MAX_LONG"),
    Case("train-lr-0", T, lambda w, c: train_argv(w.root, c.out, "--lr", 0),
         r"--lr must be positive"),
    Case("train-wt-dec-inf", T, lambda w, c: train_argv(w.root, c.out, "--wt_dec", "inf"),
         r"--lr, --wt_dec and --momentum must be finite numbers"),
    Case("train-tau-2", T, lambda w, c: train_argv(w.root, c.out, "--tau", 2),
         r"--tau must be in \[0, 1\]"),
    Case("train-num-workers-negative", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--num_workers", -1), r"--num_workers must be >= 0"),
    Case("train-stop-after-0", T, lambda w, c: train_argv(w.root, c.out, "--stop-after", 0),
         r"--stop-after must be positive"),
    Case("train-device-cuda-without-cuda", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--device", "cuda"),
        r"--device cuda: .*; or run on the CPU with --device cpu", needs=no_cuda),
    Case("train-amp-fp16-on-cpu", T, lambda w, c: train_argv(w.root, c.out, "--amp", "fp16"),
         r"--amp fp16 needs a CUDA device; use --amp bf16 on the CPU, or --amp off"),
    Case("train-unwritable-save-root", T, lambda w, c: replace_flag(
        train_argv(w.root, c.out), "--save_root", c.unwritable()),
        r"--save_root \S+: \S+ (is a file, not a folder|is not writable).*"
        r"choose another --save_root"),
    Case("train-torchrun-flag", T, lambda w, c: train_argv(w.root, c.out, "--nproc_per_node", 2),
         r"--nproc_per_node is an option of torchrun, not of train\.py: launch as "
         r"'torchrun --nproc_per_node"),
    Case("train-dist-timeout-0", T, lambda w, c: train_argv(w.root, c.out, "--dist-timeout", 0),
         r"--dist-timeout.*0 is not a positive number of seconds"),
    # ---- infer.py -------------------------------------------------------------------------
    Case("infer-random-bytes-jpg", I, lambda w, c: infer_argv(
        c.root(edit=random_bytes_jpg), w.eps, "--png-dir", c.out),
        r"img_002: cannot read image \S+img_002\.jpg .*" + FIX_FILE, subprocess=True),
    Case("infer-text-weights", I, lambda w, c: infer_argv(w.root, w.text, "--png-dir", c.out),
         r"weights\.txt: not a PyTorch weights file.*pass the \.pth written by torch\.save"),
    Case("infer-pickled-pth", I, lambda w, c: infer_argv(w.root, w.evil, "--png-dir", c.out),
         r"evil\.pth: not a plain weights file: .*refused for safety.*re-save only the weights"),
    Case("infer-scales-0", I, lambda w, c: infer_argv(w.root, w.eps, "--png-dir", c.out,
                                                      "--scales", 0),
         r"--scales 0\.0: each scale must be in \[0\.05, 8\.0\] \(paper: 0\.5 1\.0 1\.5 2\.0\)"),
    Case("infer-scales-0.01", I, lambda w, c: infer_argv(w.root, w.eps, "--png-dir", c.out,
                                                         "--scales", 1, 0.01),
         r"--scales 0\.01: each scale must be in \[0\.05, 8\.0\]"),
    Case("infer-num-workers-negative", I, lambda w, c: replace_flag(
        infer_argv(w.root, w.eps, "--png-dir", c.out), "--num-workers", -1),
        r"--num-workers -1 must be >= 0"),
    Case("infer-writer-threads-0", I, lambda w, c: replace_flag(
        infer_argv(w.root, w.eps, "--png-dir", c.out), "--writer-threads", 0),
        r"--writer-threads 0 must be >= 1"),
    Case("infer-thr-1.5", I, lambda w, c: infer_argv(w.root, w.eps, "--png-dir", c.out,
                                                     "--thr", 1.5),
         r"--thr 1\.5 is outside \[0, 1\].*paper: 0\.20"),
    Case("infer-thr-nan", I, lambda w, c: infer_argv(w.root, w.eps, "--png-dir", c.out,
                                                     "--thr", "nan"),
         r"--thr nan is outside \[0, 1\]"),
    Case("infer-crf-alpha-inf", I, lambda w, c: infer_argv(w.root, w.eps, "--crf", c.out,
                                                           "--crf_alpha", "inf"),
         r"--crf_alpha a finite number > 0"),
    Case("infer-vis-num-negative", I, lambda w, c: infer_argv(w.root, w.eps, "--vis-dir", c.out,
                                                              "--vis-num", -1),
         r"--vis-num -1 must be >= 0"),
    Case("infer-nothing-to-write", I, lambda w, c: infer_argv(w.root, w.eps),
         r"nothing to write: pass at least one of --png-dir"),
    Case("infer-unwritable-png-dir", I, lambda w, c: infer_argv(
        w.root, w.eps, "--png-dir", c.unwritable()),
        r"--png-dir \S+: \S+ (is a file, not a folder|is not writable).*choose another --png-dir"),
    Case("infer-eps-checkpoint-for-C-on-C+1", I, lambda w, c: infer_argv(
        c.root(edit=four_classes), w.eps, "--png-dir", c.out),
        r"small_eps\.pth: is a small_eps checkpoint for 3 classes \(recorded in the file\), but "
        r"the dataset has 4; pass the dataset it was trained on"),
    Case("infer-unrecorded-checkpoint-fits-two-heads", I, lambda w, c: infer_argv(
        c.root(edit=lambda r: (r / "labels.txt").write_text(
            "".join(f"{i} c{i}\n" for i in range(22)))), w.voc_eps, "--png-dir", c.out),
        r"voc_eps\.pth: has no network record and its shapes fit small_cls for 21 classes.* or "
        r"small_eps for 20 classes.*pass --network"),
    Case("infer-dataset-coco-with-voc-checkpoint", I, lambda w, c: infer_argv(
        w.root, w.voc_eps, "--png-dir", c.out, "--dataset", "coco", "--metadata-dir",
        coco_metadata(c))[2:],
        r"voc_eps\.pth: fits small_cls for 21 classes.* or small_eps for 20 classes.*but the "
        r"dataset has 80 classes; pass the dataset it was trained on"),
    Case("infer-deeplab-checkpoint", I, lambda w, c: infer_argv(
        w.root, w.deeplab, "--png-dir", c.out),
        r"checkpoint_final\.pth: a DeepLab-v2 segmentation checkpoint \(train_seg\.py\), not a "
        r"classifier; run it with infer_seg\.py"),
    Case("infer-network-unknown", I, lambda w, c: infer_argv(
        w.root, w.eps, "--png-dir", c.out, "--network", "resnet50_eps"),
        r"unknown --network 'resnet50_eps'; choose one of .*leave it out"),
    Case("infer-new-png-dir-with-cam-dir-of-other-weights", I, lambda w, c: (
        c.unchanged(w.cam), infer_argv(w.root, w.cls, "--png-dir", c.out, "--cam-dir", w.cam))[1],
        r"cam holds results made with other settings \(weights: .*small_eps\.pth' -> .*"
        r"small_cls\.pth'.*pass --overwrite to recompute every image, or choose another folder"),
    Case("infer-missing-root", I, lambda w, c: infer_argv(c.tmp / "nope", w.eps,
                                                          "--png-dir", c.out),
         r"--img_root \S+nope: no such folder; pass the dataset root"),
    Case("infer-missing-image-labels", I, lambda w, c: infer_argv(
        c.root(edit=no_image_labels), w.eps, "--png-dir", c.out),
        r"image_labels\.txt: file not found; make it with tools/make_cls_labels\.py"),
    Case("infer-id-without-labels", I, lambda w, c: infer_argv(
        c.root(edit=id_without_labels), w.eps, "--png-dir", c.out),
        r"no image labels for id 'img_999'; .*remove the id from the list"),
    Case("infer-empty-list", I, lambda w, c: infer_argv(
        c.root(edit=empty_list), w.eps, "--png-dir", c.out),
        r"train\.txt: the id list is empty; put one image id per line"),
    Case("infer-labels-malformed", I, lambda w, c: infer_argv(
        c.root(edit=labels_malformed), w.eps, "--png-dir", c.out),
        r"labels\.txt:2: expected '<index> <name>'"),
    Case("infer-device-cuda-without-cuda", I, lambda w, c: replace_flag(
        infer_argv(w.root, w.eps, "--png-dir", c.out), "--device", "cuda"),
        r"--device cuda: .*; or run on the CPU with --device cpu", needs=no_cuda),
    Case("infer-torchrun-flag", I, lambda w, c: infer_argv(
        w.root, w.eps, "--png-dir", c.out, "--nnodes=2"),
        r"--nnodes is an option of torchrun, not of infer\.py"),
    # ---- evaluate.py ----------------------------------------------------------------------
    Case("evaluate-rgb-gt", E, lambda w, c: replace_flag(
        eval_argv(c.root(edit=rgb_gt), c.out / "miou.txt"), "--num-workers", 2),
        r"SegmentationClass/img_001\.png: label image has mode 'RGB'; expected a single-channel "
        r"PNG whose values are class indices", subprocess=True),
    Case("evaluate-prediction-of-another-size", E, lambda w, c: eval_argv(
        w.root, c.out / "miou.txt", pred=c.root(edit=pred_wrong_size) / "pseudo"),
        r"pseudo/img_001\.png: prediction size 10x10 \(WxH\) differs from the ground truth .*"
        r"must be produced at the original image size"),
    Case("evaluate-thr-range-reversed", E, lambda w, c: drop_flag(
        eval_argv(w.root, c.out / "s.txt"), "--pred_dir") + ["--cam-dir", w.cam, "--thr-range",
                                                             0.6, 0.1, 0.05],
        r"--thr-range 0\.6 0\.1 0\.05: .*below start.*pass START <= STOP and STEP > 0"),
    Case("evaluate-thr-range-step-0", E, lambda w, c: drop_flag(
        eval_argv(w.root, c.out / "s.txt"), "--pred_dir") + ["--cam-dir", w.cam, "--thr-range",
                                                             0.1, 0.6, 0],
        r"--thr-range 0\.1 0\.6 0\.0: threshold step must be > 0.*pass START <= STOP"),
    Case("evaluate-thr-range-nan", E, lambda w, c: drop_flag(
        eval_argv(w.root, c.out / "s.txt"), "--pred_dir") + ["--cam-dir", w.cam, "--thr-range",
                                                             "nan", 0.6, 0.05],
        r"--thr-range nan 0\.6 0\.05: START, STOP and STEP must be finite numbers"),
    Case("evaluate-thresholds-1.5", E, lambda w, c: drop_flag(
        eval_argv(w.root, c.out / "s.txt"), "--pred_dir") + ["--cam-dir", w.cam, "--thresholds",
                                                             0.2, 1.5],
        r"--thresholds: 1\.5 outside \[0, 1\]; background thresholds must be in \[0, 1\]"),
    Case("evaluate-corrupt-cam-file", E, lambda w, c: drop_flag(
        eval_argv(w.root, c.out / "s.txt"), "--pred_dir") + ["--cam-dir", corrupt_cam_dir(w, c)],
        r"cam/img_003\.npz: cannot read CAM file .*; re-run infer\.py for this id"),
    Case("evaluate-num-workers-negative", E, lambda w, c: replace_flag(
        eval_argv(w.root, c.out / "miou.txt"), "--num-workers", -1),
        r"--num-workers -1 must be >= 0"),
    Case("evaluate-unwritable-save-path", E, lambda w, c: eval_argv(
        w.root, c.unwritable() / "miou.txt"),
        r"--save_path / --json \S+: \S+ (is a file, not a folder|is not writable)"),
    Case("evaluate-missing-root", E, lambda w, c: eval_argv(c.tmp / "nope", c.out / "miou.txt",
                                                            pred=w.root / "pseudo"),
         r"--data-root \S+nope: no such folder; pass the dataset root"),
    Case("evaluate-missing-pred-dir", E, lambda w, c: eval_argv(
        w.root, c.out / "miou.txt", "--skip-missing", pred=c.tmp / "no_preds"),
        r"--pred_dir \S+no_preds: no such folder; check the path"),
    Case("evaluate-empty-list", E, lambda w, c: eval_argv(
        c.root(edit=empty_list), c.out / "miou.txt"),
        r"train\.txt: the id list is empty; put one image id per line"),
    Case("evaluate-labels-malformed", E, lambda w, c: eval_argv(
        c.root(edit=labels_malformed), c.out / "miou.txt"), r"labels\.txt:2: expected"),
    # ---- train_seg.py ---------------------------------------------------------------------
    Case("train_seg-rgb-pseudo-mask", S, lambda w, c: seg_argv(
        c.root(edit=rgb_pseudo), c.out),
        r"mask \S+pseudo/img_001\.png has mode RGB; .*converted to indices.*" + FIX_FILE,
        subprocess=True),
    Case("train_seg-mask-values-out-of-range", S, lambda w, c: seg_argv(
        c.root(edit=pseudo_out_of_range), c.out),
        r"mask \S+img_004\.png has values \[9\] outside 0\.\.3 and 255 \(ignore\).*" + FIX_FILE),
    Case("train_seg-mask-of-another-size", S, lambda w, c: seg_argv(
        c.root(edit=pseudo_wrong_size), c.out),
        r"mask \S+img_002\.png is 10x10 \(WxH\) but its image .* is 44x32; use the mask made"),
    Case("train_seg-random-bytes-jpg", S, lambda w, c: seg_argv(
        c.root(edit=random_bytes_jpg), c.out),
        r"img_002: cannot read image \S+img_002\.jpg .*" + FIX_FILE),
    Case("train_seg-text-init", S, lambda w, c: seg_argv(w.root, c.out, "--init", w.text),
         r"weights\.txt: not a PyTorch weights file.*pass the \.pth"),
    Case("train_seg-init-missing", S, lambda w, c: seg_argv(w.root, c.out, "--init",
                                                            c.tmp / "nope.pth"),
         r"--init \S+nope\.pth: file not found; pass deeplabv1_resnet101-coco\.pth"),
    Case("train_seg-pickled-init", S, lambda w, c: seg_argv(w.root, c.out, "--init", w.evil),
         r"evil\.pth: not a plain weights file: .*refused for safety"),
    Case("train_seg-scales-0", S, lambda w, c: seg_argv(w.root, c.out, "--scales", 0.5, 0),
         r"--scales 0\.0: each scale must be in \[0\.05, 8\.0\] \(paper: 0\.5 0\.75 1\.0"),
    Case("train_seg-msc-scales-0", S, lambda w, c: seg_argv(w.root, c.out, "--msc-scales", 0),
         r"--msc-scales 0\.0: each scale must be in \[0\.05, 8\.0\] \(paper: 0\.5 0\.75\)"),
    Case("train_seg-ignore-label-300", S, lambda w, c: seg_argv(w.root, c.out,
                                                                "--ignore-label", 300),
         r"--ignore-label 300 must be in 0\.\.255"),
    Case("train_seg-lr-nan", S, lambda w, c: seg_argv(w.root, c.out, "--lr", "nan"),
         r"--lr, --weight-decay, --momentum and --poly-power must be finite"),
    Case("train_seg-batch-size-0", S, lambda w, c: replace_flag(
        seg_argv(w.root, c.out), "--batch-size", 0), r"--batch-size and --iter-size must be >= 1"),
    Case("train_seg-max-iters-negative", S, lambda w, c: seg_argv(w.root, c.out, iters=-1),
         r"--max-iters must be >= 1"),
    Case("train_seg-num-workers-negative", S, lambda w, c: replace_flag(
        seg_argv(w.root, c.out), "--num-workers", -1), r"--num-workers .*must be >= 0"),
    Case("train_seg-mask-dir-missing", S, lambda w, c: seg_argv(w.root, c.out,
                                                                masks=c.tmp / "no_masks"),
         r"--mask-dir \S+no_masks: no such folder; pass the folder of pseudo-mask PNGs"),
    Case("train_seg-missing-root", S, lambda w, c: seg_argv(c.tmp / "nope", c.out,
                                                            masks=w.root / "pseudo"),
         r"--data_root \S+nope: no such folder"),
    Case("train_seg-eval-list-missing", S, lambda w, c: seg_argv(w.root, c.out, "--eval-list",
                                                                 "nolist"),
         r"id list 'nolist' not found"),
    Case("train_seg-resume-text-file", S, lambda w, c: seg_argv(w.root, c.out, "--resume", w.text),
         r"--resume \S+weights\.txt: not a PyTorch weights file.*checkpoint_last\.pth that "
         r"train_seg\.py writes"),
    Case("train_seg-resume-larger-max-iters-on-finished-run", S, lambda w, c: (
        shutil.copytree(w.seg_done, c.tmp / "seg"), c.unchanged(c.tmp / "seg"),
        seg_argv(w.root, c.tmp / "seg", "--resume", iters=3))[2],
        r"finished at iteration 1; to train it further to --max-iters 3 pass --extend"),
    Case("train_seg-device-cuda-without-cuda", S, lambda w, c: replace_flag(
        seg_argv(w.root, c.out), "--device", "cuda"),
        r"--device cuda: .*; or run on the CPU with --device cpu", needs=no_cuda),
    Case("train_seg-amp-fp16-on-cpu", S, lambda w, c: seg_argv(w.root, c.out, "--amp", "fp16"),
         r"--amp fp16 needs a CUDA device"),
    Case("train_seg-unwritable-run-dir", S, lambda w, c: seg_argv(w.root, c.unwritable()),
         r"--run-dir \S+: \S+ (is a file, not a folder|is not writable).*choose another --run-dir"),
    # ---- infer_seg.py ---------------------------------------------------------------------
    Case("infer_seg-classifier-checkpoint", P, lambda w, c: iseg_argv(w.root, w.eps, c.out),
         r"small_eps\.pth: a classifier checkpoint \(train\.py / infer\.py\), not a DeepLab-v2 "
         r"one; pass checkpoint_final\.pth written by train_seg\.py", subprocess=True),
    Case("infer_seg-text-weights", P, lambda w, c: iseg_argv(w.root, w.text, c.out),
         r"weights\.txt: not a PyTorch weights file"),
    Case("infer_seg-pickled-pth", P, lambda w, c: iseg_argv(w.root, w.evil, c.out),
         r"evil\.pth: not a plain weights file: .*refused for safety"),
    Case("infer_seg-weights-missing", P, lambda w, c: iseg_argv(w.root, c.tmp / "nope.pth", c.out),
         r"nope\.pth: weights not found; pass checkpoint_final\.pth written by train_seg\.py"),
    Case("infer_seg-msc-scales-0", P, lambda w, c: iseg_argv(w.root, w.deeplab, c.out,
                                                             "--msc-scales", 0),
         r"--msc-scales 0\.0: each scale must be in \[0\.05, 8\.0\]"),
    Case("infer_seg-num-workers-negative", P, lambda w, c: replace_flag(
        iseg_argv(w.root, w.deeplab, c.out), "--num-workers", -1),
        r"--num-workers must be >= 0"),
    Case("infer_seg-random-bytes-jpg", P, lambda w, c: iseg_argv(
        c.root(edit=random_bytes_jpg), w.deeplab, c.out),
        r"img_002: cannot read image \S+img_002\.jpg .*" + FIX_FILE),
    Case("infer_seg-dataset-coco-with-custom-checkpoint", P, lambda w, c: iseg_argv(
        w.root / "JPEGImages", w.deeplab, c.out, "--metadata-dir", coco_metadata(c))[2:] + [
        "--dataset", "coco"],
        r"checkpoint_final\.pth predicts 4 classes but coco has 81 .*wrong --dataset\?"),
    Case("infer_seg-missing-root", P, lambda w, c: iseg_argv(c.tmp / "nope", w.deeplab, c.out),
         r"--data_root \S+nope: no such folder"),
    Case("infer_seg-unwritable-out-dir", P, lambda w, c: iseg_argv(w.root, w.deeplab,
                                                                   c.unwritable()),
         r"--out-dir / --crf-dir \S+: \S+ (is a file, not a folder|is not writable)"),
    # ---- tools ----------------------------------------------------------------------------
    Case("check_dataset-random-bytes-jpg", C, lambda w, c: [
        "--dataset", "custom", "--data-root", c.root(edit=random_bytes_jpg), "--list", "train"],
        r"\| image \| 5 \| unreadable \| 1 \| \S+img_002\.jpg", subprocess=True, report=True),
    Case("check_dataset-missing-root", C, lambda w, c: [
        "--dataset", "custom", "--data-root", c.tmp / "nope"],
        r"--data-root \S+nope: no such folder; pass the dataset root"),
    Case("check_dataset-workers-0", C, lambda w, c: [
        "--dataset", "custom", "--data-root", w.root, "--workers", 0],
        r"--workers 0 must be >= 1"),
    Case("convert_resnet38-corrupt-shape", V, lambda w, c: [w.bad_shape, c.out / "r38.pth"],
         r"shape\.params: corrupt: a shape with 1000 dimensions.*download or copy it again",
         subprocess=True),
    Case("convert_resnet38-truncated", V, lambda w, c: [w.trunc, c.out / "r38.pth"],
         r"trunc\.params: truncated: .*download or copy it again"),
    Case("convert_resnet38-text-file", V, lambda w, c: [w.text, c.out / "r38.pth"],
         r"weights\.txt: not an MXNet \.params file \(it starts with text"),
    Case("convert_resnet38-not-resnet38", V, lambda w, c: [w.other_params, c.out / "r38.pth"],
         r"other\.params: not a ResNet-38 \(ademxapp A1\) parameter name: 'a'.*"
         r"ilsvrc-cls_rna-a1_cls1000_ep-0001\.params"),
    Case("convert_resnet38-missing", V, lambda w, c: [c.tmp / "nope.params", c.out / "r38.pth"],
         r"nope\.params: file not found; download the ImageNet ResNet-38 weights"),
    Case("convert_resnet38-unwritable-output", V, lambda w, c: [w.bad_shape, c.unwritable() /
                                                                "r38.pth"],
         r"output \S+: \S+ (is a file, not a folder|is not writable)"),
    # ---- tools/make_saliency.py, tools/eval_saliency.py, infer.py --labels predicted --------
    Case("make_saliency-not-a-saliency-model", M, lambda w, c: sal_argv(
        w.root, c.out, classifier_onnx(c.tmp / "m" / "cls.onnx")),
        r"cls\.onnx is not a saliency model: output \[1, 10\] \(expected 1x1xHxW\)",
        subprocess=True, needs=no_rembg),
    Case("make_saliency-constant-model", M, lambda w, c: sal_argv(
        w.root, c.out, saliency_onnx(c.tmp / "m" / "const.onnx", constant=True)),
        r"gives a constant map .* not a working saliency model", needs=no_rembg),
    Case("make_saliency-missing-image", M, lambda w, c: sal_argv(
        c.root(edit=no_image_002), c.out, saliency_onnx(c.tmp / "m" / "tiny.onnx")),
        r"1 of 6 listed ids have no image \(img_002 .*--skip-missing", needs=no_rembg),
    Case("make_saliency-maps-without-record", M, lambda w, c: sal_argv(
        c.root(), c.tmp / "data" / "SALImages", saliency_onnx(c.tmp / "m" / "tiny.onnx")),
        r"SALImages holds 6 maps but no saliency_model\.json .*choose another --out",
        needs=no_rembg),
    Case("make_saliency-unwritable-out", M, lambda w, c: sal_argv(
        w.root, c.unwritable(), saliency_onnx(c.tmp / "m" / "tiny.onnx")),
        r"--out \S+: \S+ (is a file, not a folder|is not writable)", needs=no_rembg),
    Case("eval_saliency-unwritable-out", A, lambda w, c: [
        "--data-root", w.root, "--list", "train", "--out", c.unwritable() / "report.md",
        "--workers", 1, "--no-progress"],
        r"--out \S+: \S+ (is a file, not a folder|is not writable)"),
    Case("eval_saliency-missing-map", A, lambda w, c: [
        "--data-root", c.root(edit=no_map_002), "--list", "train", "--out", c.out,
        "--workers", 1, "--no-progress"],
        r"1 of 6 ids have no map in \S+SALImages \(img_002\): make them "
        r"\(tools/make_saliency\.py\)", subprocess=True),
    Case("eval_saliency-other-aspect-map", A, lambda w, c: [
        "--data-root", c.root(edit=saliency_other_aspect), "--list", "train", "--out", c.out,
        "--workers", 1, "--no-progress"],
        r"SALImages/img_\d+\.png is \d+x\d+ but its ground truth is \d+x\d+: another aspect"),
    Case("infer-label-thr", I, lambda w, c: infer_argv(
        w.root, w.eps, "--png-dir", c.out, "--labels", "predicted", "--label-thr", 1.5),
        r"--label-thr 1\.5 must be in \(0, 1\)"),
]
SUBPROCESS = [case for case in CASES if case.subprocess]


def test_catalogue_covers_every_entry_point_in_a_subprocess():
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.script for c in SUBPROCESS} == set(MODULES)


# ------------------------------------------------------------------------------------------------
# running a case
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launched(world, tmp_path_factory):
    """Start every subprocess case at once (each costs ~3 s of imports, mostly waiting on one
    core); the tests collect them in order while the in-process cases run."""
    procs = {}
    for case in SUBPROCESS:
        c = Ctx(tmp_path_factory.mktemp(case.id), world.root)
        argv = [str(a) for a in case.build(world, c)]
        c.snapshot()
        procs[case.id] = (subprocess.Popen(
            [sys.executable, str(REPO / case.script), *argv], cwd=c.tmp, env=ENV, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE), c)
    yield procs
    for proc, _ in procs.values():  # a failed test must not leave its command running
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_in_process(script: str, argv: list, capsys, monkeypatch):
    """``run_cli`` of the script's module, as its ``__main__`` block runs it; returns (exit
    status, stdout, stderr)."""
    module = MODULES[script]
    monkeypatch.setattr(sys, "argv", [str(REPO / script)])  # the prog name of the messages
    capsys.readouterr()
    console = [h for h in logging.getLogger().handlers if getattr(h, "_eps_console", False)]
    streams = [h.setStream(sys.stderr) for h in console]  # capsys's stderr, for this call
    try:
        rc = closing_logs(lambda: run_cli(module.get_args_parser, module.main, module.__doc__,
                                   argv=[str(a) for a in argv]))
    except SystemExit as e:  # argparse's errors
        rc = e.code
    finally:
        for h, s in zip(console, streams):
            h.setStream(s)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", sorted(CASES, key=lambda c: c.subprocess), ids=lambda c: c.id)
def test_bad_input(case, world, launched, tmp_path, capsys, monkeypatch):
    reason = case.needs() if case.needs else None
    if reason:
        pytest.skip(reason)
    if case.subprocess:
        proc, c = launched[case.id]
        out, err = proc.communicate(timeout=300)
        rc = proc.returncode
    else:
        c = Ctx(tmp_path, world.root)
        argv = case.build(world, c)
        c.snapshot()
        rc, out, err = run_in_process(case.script, argv, capsys, monkeypatch)
    text = out + err
    assert "Traceback" not in text, text[-3000:]
    assert "weights_only=False" not in text  # never torch's advice to run a file's code
    prog = Path(case.script).name
    errors = [line for line in err.splitlines() if re.match(rf"{re.escape(prog)}: error: ", line)]
    if case.report:  # check_dataset: the problem table on stdout and exit 1
        assert rc == 1 and not errors, err[-2000:]
        assert re.search(case.match, out), out
    else:
        assert rc == 2, (rc, text[-3000:])
        assert len(errors) == 1, err[-3000:]
        assert re.search(case.match, errors[0]), errors[0]
    assert not c.out.exists(), f"{c.out} was created by a run that failed its checks"
    assert not c.added(), f"a run that failed its checks wrote {c.added()}"
    for check in c.after:
        check()


# ------------------------------------------------------------------------------------------------
# legitimate input: the same result as the clean twin
# ------------------------------------------------------------------------------------------------
def duplicate_first_id(path: Path) -> None:
    ids = path.read_text().splitlines()
    path.write_text("\n".join(ids + ids[:2]) + "\n")


def test_repeated_list_ids_give_the_clean_result(world, tmp_path, capsys, monkeypatch):
    c = Ctx(tmp_path, world.root)
    dup = c.root("dup", edit=lambda r: duplicate_first_id(r / "train.txt"))
    results = {}
    for name, root in (("clean", world.root), ("dup", dup)):
        runs, cam, save = tmp_path / f"runs_{name}", tmp_path / f"cam_{name}", tmp_path / name
        rc, _, err = run_in_process(T, train_argv(root, runs, network="small_cls"), capsys,
                                    monkeypatch)
        assert rc == 0, err[-2000:]
        if name == "dup":
            assert re.search(r"WARNING .*dup/train\.txt: 2 duplicate id line\(s\) dropped", err)
        rc, _, err = run_in_process(I, infer_argv(root, world.eps, "--cam-dir", cam), capsys,
                                    monkeypatch)
        assert rc == 0, err[-2000:]
        rc, _, err = run_in_process(E, eval_argv(root, save / "miou.txt"), capsys, monkeypatch)
        assert rc == 0, err[-2000:]
        record = json.loads((save / "miou.json").read_text())
        results[name] = ((runs / "run" / "checkpoint_cls.pth").read_bytes(), npz_arrays(cam),
                         record["num_images"], record["confusion"])
    assert results["dup"][2] == N_IMAGES  # each image counted once
    assert results["dup"] == results["clean"]


def npz_arrays(folder: Path) -> dict:
    """{file name: {key: array as bytes}} (the npz files themselves hold write times)."""
    return {p.name: {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in load_npz(p).items()}
            for p in sorted(folder.glob("*.npz"))}


def to_16bit(path: Path, fmt: Optional[str] = None) -> None:
    """Rewrite an image as 16-bit grayscale holding 257 * its 8-bit grey values."""
    grey = np.array(Image.open(path).convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(path, format=fmt or "PNG")


def to_8bit_grey(path: Path) -> None:
    Image.open(path).convert("L").save(path, format="PNG")


def test_16bit_saliency_maps_train_like_their_8bit_twins(world, tmp_path, capsys, monkeypatch):
    c = Ctx(tmp_path, world.root)
    deep = c.root("deep", edit=lambda r: [to_16bit(p) for p in (r / "SALImages").glob("*.png")])
    assert Image.open(deep / "SALImages" / "img_000.png").mode.startswith("I")
    final = {}
    for name, root in (("8bit", world.root), ("16bit", deep)):
        rc, _, err = run_in_process(T, train_argv(root, tmp_path / name), capsys, monkeypatch)
        assert rc == 0, err[-2000:]
        final[name] = (tmp_path / name / "run" / "checkpoint_cls.pth").read_bytes()
    assert final["16bit"] == final["8bit"]


def test_16bit_images_infer_like_their_8bit_twins(world, tmp_path, capsys, monkeypatch):
    # Grey images in PNG files under the .jpg names the datasets look up (PIL reads the content).
    c = Ctx(tmp_path, world.root)
    grey = c.root("grey", edit=lambda r: [to_8bit_grey(p) for p in (r / "JPEGImages").glob("*")])
    deep = c.root("deep", edit=lambda r: [to_16bit(p) for p in (r / "JPEGImages").glob("*")])
    outputs = {}
    for name, root in (("8bit", grey), ("16bit", deep)):
        out = tmp_path / f"out_{name}"
        rc, _, err = run_in_process(I, infer_argv(root, world.eps, "--cam-dir", out / "cam",
                                                  "--png-dir", out / "png"), capsys, monkeypatch)
        assert rc == 0, err[-2000:]
        outputs[name] = (npz_arrays(out / "cam"),
                         {p.name: p.read_bytes() for p in sorted((out / "png").glob("*.png"))})
    assert len(outputs["8bit"][0]) == len(outputs["8bit"][1]) == N_IMAGES
    assert outputs["16bit"] == outputs["8bit"]


# ------------------------------------------------------------------------------------------------
# faults: stale temporary files, a killed run's processes
# ------------------------------------------------------------------------------------------------
def test_stale_temporary_files_are_removed_at_the_next_start(world, tmp_path, capsys, monkeypatch):
    # train.py: its run directory is its own, so any temporary file there is a killed run's.
    argv = train_argv(world.root, tmp_path / "runs", network="small_cls")
    rc, _, err = run_in_process(T, argv + ["--stop-after", 1], capsys, monkeypatch)
    assert rc == 0, err[-2000:]
    run_dir = tmp_path / "runs" / "run"
    stale = run_dir / ".checkpoint_last.k3x9_a0q.tmp.pth"
    stale.write_bytes(b"half a checkpoint")
    notes = run_dir / ".notes.txt"  # a user's own dotfile stays
    notes.write_text("mine")
    rc, _, err = run_in_process(T, argv + ["--resume"], capsys, monkeypatch)
    assert rc == 0, err[-2000:]
    assert not stale.exists() and notes.exists()
    assert (run_dir / train.FINAL_NAME).is_file()
    # infer.py: other ranks or jobs may write into its folders, so only old temporary files go.
    png = tmp_path / "png"
    old, fresh = png / ".img_000.abcdefgh.tmp.png", png / ".img_001.ijklmnop.tmp.png"
    png.mkdir()
    for f in (old, fresh):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    rc, _, err = run_in_process(I, infer_argv(world.root, world.eps, "--png-dir", png), capsys,
                                monkeypatch)
    assert rc == 0, err[-2000:]
    assert not old.exists() and fresh.exists()
    assert len([p for p in png.glob("*.png") if not p.name.startswith(".")]) == N_IMAGES


def marked_processes(marker: bytes) -> List[int]:
    """Live processes whose environment holds ``marker`` (a command's whole tree inherits it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.timeout(300)
def test_kill_9_of_infer_with_crf_writers_leaves_no_process(world, tmp_path):
    # 200 copies of one 320x240 image: the CRF writers stay busy long after the kill.
    root = tmp_path / "data"
    (root / "JPEGImages").mkdir(parents=True)
    img = np.random.RandomState(0).randint(0, 255, (240, 320, 3)).astype(np.uint8)
    Image.fromarray(img).save(root / "JPEGImages" / "k000.jpg", quality=90)
    data = (root / "JPEGImages" / "k000.jpg").read_bytes()
    ids = [f"k{i:03d}" for i in range(200)]
    for i in ids[1:]:
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(data)
    shutil.copy(world.root / "labels.txt", root / "labels.txt")
    (root / "image_labels.txt").write_text("".join(f"{i} 0 1\n" for i in ids))
    (root / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    marker = f"EPS_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(ENV, EPS_TEST_MARKER=marker.split("=", 1)[1])
    crf = tmp_path / "crf"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "infer.py"), "--dataset", "custom", "--img_root", str(root),
         "--weights", str(world.eps), "--crf", str(crf), "--writer-threads", "2",
         "--num-workers", "1", "--device", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # main process, its DataLoader worker, 2 CRF writers (at work: a CRF PNG exists) and
        # multiprocessing's resource tracker
        deadline = time.time() + 240
        while not (len(marked_processes(marker.encode())) >= 5 and any(crf.glob("*.png"))):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, f"not started: {marked_processes(marker.encode())}"
            time.sleep(0.2)
        assert len(list(crf.glob("*.png"))) < len(ids)  # still running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while marked_processes(marker.encode()) and time.time() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120]
                for pid in marked_processes(marker.encode())}
        assert not left, f"still running 10 s after the kill: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        for pid in marked_processes(marker.encode()):  # this test's own processes only
            os.kill(pid, signal.SIGKILL)


def test_small_shared_memory_is_refused_for_all_local_processes(tmp_path, monkeypatch):
    """/dev/shm is shared by every process torchrun starts on a machine: the need scales with
    LOCAL_WORLD_SIZE, and the refusal names the count and a flag every entry point accepts."""
    from utils.device import SHM_PER_WORKER_MB, DeviceError, check_shared_memory
    free = 3 * SHM_PER_WORKER_MB * 2 ** 20
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    check_shared_memory(2, path=str(tmp_path))  # one process, 2 workers: 128 of 192 MB
    check_shared_memory(0, path=str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"2 processes x 2 data-loading workers need about 256 MB"
                                          r".*--shm-size=8g.*--num-workers 0"):
        check_shared_memory(2, path=str(tmp_path))
    for script in ("train", "train_seg", "infer"):  # the fix it names is a real flag
        parser = importlib.import_module(script).get_args_parser()
        assert "--num-workers" in parser._option_string_actions, script
