"""Convert a published ``cls_labels.npy`` (a pickled {id: float32 (C,)} dict) to image_labels.txt.

This is the ONLY place in the project that unpickles anything, and only on an explicit
command: unpickling runs code embedded in the file, so convert files from a source you trust
(the EPS / PSA repositories), once, and use the text file from then on.

    python tools/convert_cls_labels_npy.py --npy EPS/metadata/voc12/cls_labels.npy \\
        --dataset voc12 --out my_labels/image_labels.txt

IRN-style files whose keys are integers (2007000032) are turned into VOC ids (2007_000032).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.metadata import write_image_labels  # noqa: E402
from data.registry import DATASETS, get_dataset  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)


class ConvertError(UserError):
    """The npy file is not a label dict; the message names the file and the fix."""


def load_pickled_label_dict(path) -> dict:
    """np.load(allow_pickle=True).item(), with a warning: the one deliberate unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    logger.warning("unpickling %s: this executes code stored in the file; only convert files from "
                   "a source you trust", path)
    obj = np.load(path, allow_pickle=True)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected np.save of a dict {{id: label vector}}, got "
                           f"{type(obj).__name__}; is this a cls_labels.npy?")
    return obj


def normalize_key(key) -> str:
    """str ids stay; IRN's int-encoded VOC ids (2007000032) become '2007_000032'."""
    if isinstance(key, (int, np.integer)):
        s = f"{int(key):010d}"
        return f"{s[:4]}_{s[4:]}"
    return str(key)


def label_dict_to_vectors(raw: Mapping, num_classes: Optional[int], source="") -> Dict[str, np.ndarray]:
    """Validate and convert {key: vector}: every vector has C entries that are 0 or 1."""
    out: Dict[str, np.ndarray] = {}
    for key, vec in raw.items():
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if num_classes is None:
            num_classes = vec.size
        if vec.size != num_classes:
            raise ConvertError(f"{source}: label of {key!r} has {vec.size} entries, expected {num_classes} "
                               f"(foreground classes only); use the --dataset the file was made for")
        if not np.all((vec == 0) | (vec == 1)):
            raise ConvertError(f"{source}: label of {key!r} is not a 0/1 vector: {vec.tolist()}")
        out[normalize_key(key)] = vec
    return out


def get_args_parser():
    p = argparse.ArgumentParser("Convert cls_labels.npy to image_labels.txt", add_help=False)
    p.add_argument("--npy", type=Path, required=True, help="the pickled cls_labels.npy (trusted source only)")
    p.add_argument("--out", type=Path, required=True, help="output image_labels.txt")
    p.add_argument("--dataset", type=str, default="voc12", choices=sorted(DATASETS),
                   help="dataset whose labels.txt gives C and the class names (voc12: C=20, coco: C=80)")
    p.add_argument("--metadata-dir", "--metadata_dir", dest="metadata_dir", type=Path, default=None,
                   help="folder with labels.txt (needed for --dataset custom)")
    p.add_argument("--sort", action=argparse.BooleanOptionalAction, default=False,
                   help="sort ids (default: keep the dict's order)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing output file")
    return p


def main(args) -> Dict[str, np.ndarray]:
    if args.out.exists() and not args.overwrite:
        raise ConvertError(f"{args.out} exists; pass --overwrite to replace it")
    info = get_dataset(args.dataset, metadata_dir=args.metadata_dir)
    labels = label_dict_to_vectors(load_pickled_label_dict(args.npy), info.num_classes, args.npy)
    if args.sort:
        labels = dict(sorted(labels.items()))
    empty = sum(1 for v in labels.values() if not v.any())
    if empty:
        logger.warning("%d ids have no class", empty)
    names = info.class_names
    write_image_labels(args.out, labels,
                       f"image_id followed by the 0-based indices of the classes present "
                       f"(0={names[0]} ... {len(names) - 1}={names[-1]})\n"
                       f"converted by tools/convert_cls_labels_npy.py from {args.npy.name}")
    logger.info("wrote %s (%d ids)", args.out, len(labels))
    return labels


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
