"""The published inference process, re-implemented for timing on the CPU (tools/benchmarks/
published.py runs it as a whole process beside ``infer.py``).

It does what EPS ``infer.py`` does for one process (``infer_cam_mp`` in a child started by
``torch.multiprocessing.Process``, ``predict_cam``, ``preprocess``), step for step and with the
same libraries, so that start-up, weight loading, decoding, the 8 forward passes of batch 1,
the per-view upsampling in numpy and the writing cost what they cost there:

* imports torch, torchvision, numpy, PIL and imageio (the published module imports all five);
* the parent reads the list and the labels, then forks one child, which builds the network
  (random init, as ``Net(...)`` does) and loads the weights file;
* per image: RGB decode, 4 bicubic resizes to round(size * s), float32 normalisation per
  channel from float64 arithmetic, HWC -> CHW as a transposed *view* (so the unflipped views
  reach the network with channels-last strides and the flipped copies contiguous, as there);
* per view: forward_cam, softmax over C+1 (eps), bilinear upsampling of all C+1 maps to the
  image size, numpy multiply by the label, flip back; then the sum over the views, the
  per-class max normalisation (+1e-5), argmax over [thr; CAMs];
* writes the pseudo-mask as an L-mode PNG (imageio) and, with --cam_npy, a pickled
  ``{class: map}`` .npy per image (``np.save`` of a dict; written here, never read back).

The differences the published file needs to run here at all are the ones a user has to make
(docs/inference.md): the CPU instead of ``.cuda()``, ``Image.BICUBIC`` for the removed
``Image.CUBIC`` (Pillow >= 10) and a per-view stack instead of ``np.array`` of ragged tuples
(numpy >= 1.24). The network is this project's ``resnet38_eps`` (the same modules and
operations as psa/EPS ``network/resnet38d.py``; tests/test_network_layout.py). Labels come from
``metadata/<dataset>/image_labels.txt`` instead of the pickled ``cls_labels.npy``.

    python tools/benchmarks/ref_infer.py --dataset voc12 --network network.resnet38_eps \\
        --weights W.pth --infer_list list.txt --img_root JPEGImages --thr 0.20 \\
        --n_processes_per_gpu 1 --cam_png out/png [--cam_npy out/npy]   (the published flags)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (imported by the published infer.py: part of its start-up)
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.metadata import read_class_names, read_id_list, read_image_labels  # noqa: E402
from network import build_network  # noqa: E402

SCALES = (0.5, 1.0, 1.5, 2.0)          # EPS infer.py __main__
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parents[2]


def normalize_hwc(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    out = np.empty_like(arr, np.float32)
    for c in range(3):  # float64 arithmetic per channel, stored as float32
        out[..., c] = (arr[..., c] / 255.0 - MEAN[c]) / STD[c]
    return out


def views(image: Image.Image):
    """[scale 0.5, its flip, scale 1.0, its flip, ...] as CHW arrays: transposed views, flipped
    copies (EPS infer.py preprocess)."""
    out = []
    for s in SCALES:
        size = (round(image.size[0] * s), round(image.size[1] * s))
        chw = np.transpose(normalize_hwc(image.resize(size, resample=Image.BICUBIC)), (2, 0, 1))
        out += [chw, np.flip(chw, -1).copy()]
    return out


def image_cams(model, image: Image.Image, label: np.ndarray, num_classes: int):
    size = np.asarray(image).shape[:2]
    fg_views = []
    model.eval()
    for i, view in enumerate(views(image)):
        with torch.no_grad():
            cam = model.forward_cam(torch.from_numpy(view).unsqueeze(0))
            cam = F.interpolate(F.softmax(cam, dim=1), size, mode="bilinear",
                                align_corners=False)[0]
            fg = cam[:-1].cpu().numpy() * label.reshape(num_classes, 1, 1)
            bg = cam[-1:].cpu().numpy()  # computed and dropped, as published
            if i % 2 == 1:
                fg, bg = np.flip(fg, axis=-1), np.flip(bg, axis=-1)
            fg_views.append(fg)
    return np.sum(np.array(fg_views), axis=0)


def child(args, ids, labels, num_classes):
    model = build_network("resnet38_eps", num_classes)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    for img_id in ids:
        img = Image.open(os.path.join(args.img_root, img_id + ".jpg")).convert("RGB")
        label = labels[img_id]
        sum_cam = image_cams(model, img, label, num_classes)
        norm_cam = sum_cam / (np.max(sum_cam, (1, 2), keepdims=True) + 1e-5)
        cam_dict = {j: norm_cam[j] for j in range(num_classes) if label[j] > 1e-5}
        h, w = next(iter(cam_dict.values())).shape
        scores = np.zeros((num_classes + 1, h, w), np.float32)
        for k, v in cam_dict.items():
            scores[k + 1] = v
        scores[0] = args.thr
        pred = np.argmax(scores, axis=0).astype(np.uint8)
        if args.cam_npy is not None:  # pickled, as published (written, never read back here)
            np.save(os.path.join(args.cam_npy, img_id + ".npy"), cam_dict)
        if args.cam_png is not None:
            imageio.imwrite(os.path.join(args.cam_png, img_id + ".png"), pred)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=str, required=True, help="resnet38_eps state dict (.pth)")
    p.add_argument("--infer_list", type=str, required=True, help="id list file")
    p.add_argument("--img_root", type=str, required=True, help="folder of <id>.jpg")
    p.add_argument("--cam_npy", type=str, default=None, help="output folder of <id>.npy")
    p.add_argument("--cam_png", type=str, default=None, help="output folder of <id>.png")
    p.add_argument("--dataset", type=str, default="voc12", help="metadata/<dataset> labels")
    p.add_argument("--thr", type=float, default=0.20, help="background score (paper: 0.20)")
    p.add_argument("--network", type=str, default="network.resnet38_eps",
                   choices=["network.resnet38_eps"], help="the published EPS network only")
    p.add_argument("--n_processes_per_gpu", type=int, nargs="*", default=[1], choices=[1],
                   help="one child process, as the published command runs it")
    args = p.parse_args()
    meta = REPO / "metadata" / args.dataset
    num_classes = len(read_class_names(meta / "labels.txt")) - 1
    ids = read_id_list(args.infer_list)
    labels = read_image_labels(meta / "image_labels.txt", num_classes)
    for folder in (args.cam_npy, args.cam_png):
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
    proc = torch.multiprocessing.get_context("fork").Process(
        target=child, args=(args, ids, {i: labels[i] for i in ids}, num_classes))
    proc.start()
    proc.join()
    return proc.exitcode


if __name__ == "__main__":
    sys.exit(main())
