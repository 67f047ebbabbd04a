"""Make COCO-14 semantic masks (PNG, 0 = background, class index + 1) from instances JSON.

For users who lack the masks EPS distributes (Google Drive, ``SegmentationClass/{train2014,
val2014}``); the exact generator of those is unknown, so this follows the common recipe
(docs/data.md): start from 0, then for every annotation of the image in file order decode its
polygon / RLE with pycocotools (the same calls as ``COCO.annToMask``) and paint its pixels with
``rank(category id) + 1`` (1..80); later annotations overwrite earlier ones where they overlap.

Crowd annotations (``iscrowd=1``, RLE regions covering a group of objects): ``--crowd class``
(default) paints them like any other annotation, as the common recipe does; ``--crowd ignore``
paints them 255 (ignored by the evaluator); ``--crowd skip`` leaves them out.

Output: ``<out-root>/<split>/<COCO_split_id>.png`` palette PNGs whose pixel values are the class
indices. Writes are atomic and existing files are skipped, so an interrupted run resumes.

    python tools/make_coco_masks.py --data-root COCO --workers 8
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.metadata import read_id_list  # noqa: E402
from tools.make_cls_labels import (COCO_KEY_FORMAT, LabelToolError, coco_category_ranks,  # noqa: E402
                                   coco_split_of, load_coco_json)
from utils.cli import run_cli  # noqa: E402
from utils.io import save_label_png  # noqa: E402

logger = logging.getLogger(__name__)

CROWD_MODES = ("class", "ignore", "skip")
IGNORE_VALUE = 255


def segmentation_to_mask(segm, height: int, width: int) -> np.ndarray:
    """Binary uint8 (H, W) mask of one COCO segmentation: polygons, uncompressed RLE (crowd) or
    compressed RLE, decoded with pycocotools exactly like ``COCO.annToMask``."""
    from pycocotools import mask as mask_utils  # imported here: only this tool needs it
    if isinstance(segm, list):
        if not segm:  # a few annotations carry no polygon at all
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():
        # pycocotools 2.0.x builds an array with copy=False, which numpy 2 reports as a
        # DeprecationWarning on every decode: harmless, and it would flood the log.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def render_mask(height: int, width: int, shapes: Sequence[Tuple[int, object]]) -> np.ndarray:
    """uint8 (H, W) semantic mask from (value, segmentation) pairs painted in order."""
    mask = np.zeros((height, width), np.uint8)
    for value, segm in shapes:
        mask[segmentation_to_mask(segm, height, width) > 0] = value
    return mask


def image_tasks(data: Mapping, split: str, out_dir: Path, crowd: str = "class",
                key_format: str = COCO_KEY_FORMAT, all_images: bool = False,
                only_ids: Optional[set] = None) -> Iterator[Tuple[str, Path, int, int, list]]:
    """(key, out path, H, W, [(value, segmentation), ...]) per image, annotations in file order.

    By default only images with >= 1 annotation (crowd ones count), matching the EPS lists."""
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
    ranks = coco_category_ranks(data["categories"])
    shapes: dict = {}
    for ann in data["annotations"]:
        entry = shapes.setdefault(int(ann["image_id"]), [])
        if ann.get("iscrowd", 0):
            if crowd == "skip":
                continue
            value = IGNORE_VALUE if crowd == "ignore" else ranks[int(ann["category_id"])] + 1
        else:
            value = ranks[int(ann["category_id"])] + 1
        entry.append((value, ann["segmentation"]))
    for img in sorted(data["images"], key=lambda im: int(im["id"])):
        image_id = int(img["id"])
        if image_id not in shapes and not all_images:
            continue
        key = key_format.format(split=split, id=image_id)
        if only_ids is not None and key not in only_ids:
            continue
        yield key, out_dir / f"{key}.png", int(img["height"]), int(img["width"]), shapes.get(image_id, [])


def _write_one(task) -> str:
    key, path, h, w, shapes, palette = task
    save_label_png(path, render_mask(h, w, shapes), palette=palette)
    return key


def make_masks(data: Mapping, split: str, out_dir: Path, *, crowd: str = "class", workers: int = 0,
               overwrite: bool = False, palette: bool = True, all_images: bool = False,
               only_ids: Optional[set] = None, key_format: str = COCO_KEY_FORMAT) -> Tuple[int, int]:
    """Write the masks of one split; returns (written, skipped because they already exist)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo: List[tuple] = []
    skipped = 0
    for key, path, h, w, shapes in image_tasks(data, split, out_dir, crowd, key_format, all_images, only_ids):
        if path.exists() and not overwrite:  # atomic writes: an existing file is complete
            skipped += 1
            continue
        todo.append((key, path, h, w, shapes, palette))
    bar = dict(total=len(todo), desc=f"masks {split}", unit="img", disable=not todo)
    if workers > 0 and len(todo) > 1:
        # 'spawn' would re-import this module per worker; fork is cheap and shares nothing mutable.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_write_one, todo, chunksize=16), **bar):
                pass
    else:
        for task in tqdm(todo, **bar):
            _write_one(task)
    return len(todo), skipped


def get_args_parser():
    p = argparse.ArgumentParser("Make COCO semantic masks", add_help=False)
    p.add_argument("--data-root", "--data_root", dest="data_root", type=Path, default=None,
                   help="COCO root holding annotations/instances_{train,val}2014.json; masks go to "
                        "<data-root>/SegmentationClass/<split>/ unless --out-root is given")
    p.add_argument("--annotations", type=Path, nargs="+", default=None,
                   help="instances JSON files (default: the train2014 and val2014 ones under --data-root)")
    p.add_argument("--out-root", type=Path, default=None,
                   help="output root; masks go to <out-root>/<split>/<id>.png (default "
                        "<data-root>/SegmentationClass, the layout of the published masks)")
    p.add_argument("--crowd", type=str, default="class", choices=CROWD_MODES,
                   help="crowd regions: class = paint with their class (common recipe, default), "
                        "ignore = 255 (not scored), skip = leave out")
    p.add_argument("--ids", type=Path, default=None,
                   help="only images whose id is in this list file (e.g. metadata/coco/train.txt)")
    p.add_argument("--all-images", action=argparse.BooleanOptionalAction, default=False,
                   help="also write all-background masks for images without annotations "
                        "(default: only the images with >= 1 annotation, as in the EPS lists)")
    p.add_argument("--key-format", type=str, default=COCO_KEY_FORMAT,
                   help=f"file name pattern with {{split}} and {{id}} (default {COCO_KEY_FORMAT!r})")
    p.add_argument("--palette", action=argparse.BooleanOptionalAction, default=True,
                   help="write VOC-palette PNGs (pixel values are the class indices either way)")
    p.add_argument("--workers", type=int, default=4, help="parallel worker processes (0 = in-process)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="rewrite masks that already exist")
    return p


def main(args) -> Tuple[int, int]:
    if args.annotations is None and args.data_root is None:
        raise LabelToolError("pass --data-root (COCO root with annotations/) or --annotations")
    files = args.annotations or [args.data_root / "annotations" / f"instances_{s}2014.json"
                                 for s in ("train", "val")]
    out_root = args.out_root or (args.data_root / "SegmentationClass" if args.data_root else None)
    if out_root is None:
        raise LabelToolError("pass --out-root (or --data-root) to say where the masks go")
    only_ids = set(read_id_list(args.ids)) if args.ids is not None else None
    total_written = total_skipped = 0
    for path in files:
        split = coco_split_of(path)
        data = load_coco_json(path)
        written, skipped = make_masks(data, split, out_root / split, crowd=args.crowd,
                                      workers=args.workers, overwrite=args.overwrite,
                                      palette=args.palette, all_images=args.all_images,
                                      only_ids=only_ids, key_format=args.key_format)
        logger.info("%s: wrote %d masks, kept %d existing (in %s)", path.name, written, skipped,
                    out_root / split)
        total_written += written
        total_skipped += skipped
    return total_written, total_skipped


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
