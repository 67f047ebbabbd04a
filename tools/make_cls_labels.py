"""Make image-level labels (the project's ``image_labels.txt`` text format) from annotations.

VOC (psa ``voc12/make_cls_labels.py``): for every listed id, read
``Annotations/<id>.xml`` and mark every ``<name>`` element that is one of the classes; part names
(head / hand / foot) are not classes and drop out; difficult and truncated objects count.

    python tools/make_cls_labels.py --dataset voc12 --data-root VOCdevkit/VOC2012 \\
        --out my_labels/image_labels.txt            # ids of train_aug + val, as published

A spreadsheet (docs/custom-data.md): a CSV with a header row and one row per image, either one
column of class names per image ("image,labels" / "a.jpg,cat;dog") or one 0/1 column per class
("image,cat,dog" / "a.jpg,1,1"). Ids are the file names without extension. The class names come
from labels.txt when the metadata folder has one, else from the CSV (labels.txt is then written
beside --out: one-column names sorted, per-class columns in their order). A "split" column
(train / val ...) gives one list per split with --list-dir; images whose row names no class leave
the training lists (train*.txt) for no_class.txt beside them.

    python tools/make_cls_labels.py --dataset custom --data-root my_data --csv labels.csv \
        --out my_data/image_labels.txt --list-dir my_data

COCO-14 (docs/data.md): class index = rank of the category id among the sorted category ids
(person = 0 ... toothbrush = 79; NOT id - 1); every annotation of an image counts, crowd ones
included by default; key ``COCO_<split>_<12-digit id>``. ``--list-dir`` also writes the id list
of each split (images with >= 1 annotation: 82,081 train / 40,137 val).

    python tools/make_cls_labels.py --dataset coco --data-root COCO \\
        --out metadata/coco/image_labels.txt --list-dir my_lists
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.metadata import write_id_list, write_image_labels  # noqa: E402
from data.registry import DATASETS, get_dataset  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

COCO_KEY_FORMAT = "COCO_{split}_{id:012d}"


class LabelToolError(UserError):
    """Bad annotation input; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------
def voc_names_in_xml(xml_path) -> List[str]:
    """Text of every <name> element at any depth (object and part names alike)."""
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise LabelToolError(f"annotation not found: {xml_path}; check --data-root (the folder "
                             f"that holds Annotations/) or remove the id from the list")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise LabelToolError(f"cannot parse {xml_path}: {e}; re-extract the VOC archive") from None
    # strip(): VOC names carry no whitespace, so this only guards hand-edited files.
    return [(el.text or "").strip() for el in root.iter("name")]


def voc_label_vector(xml_path, class_names: Sequence[str]) -> np.ndarray:
    """float32 (C,) multi-hot; names that are not classes (part names, typos) are ignored."""
    index = {n: i for i, n in enumerate(class_names)}
    vec = np.zeros(len(class_names), np.float32)
    for name in voc_names_in_xml(xml_path):
        if name in index:
            vec[index[name]] = 1.0
    return vec


def make_voc_labels(annotation_dir, ids: Iterable[str], class_names: Sequence[str]) -> Dict[str, np.ndarray]:
    return {i: voc_label_vector(Path(annotation_dir) / f"{i}.xml", class_names) for i in ids}


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def coco_category_ranks(categories: Sequence[Mapping]) -> Dict[int, int]:
    """{category id: 0-based class index} = rank among the sorted ids (1->0, ..., 90->79)."""
    return {cid: k for k, cid in enumerate(sorted(int(c["id"]) for c in categories))}


def coco_split_of(json_path) -> str:
    """``instances_train2014.json`` -> ``train2014`` (the split part of the COCO keys)."""
    m = re.fullmatch(r"instances_(\w+)\.json", Path(json_path).name)
    if not m:
        raise LabelToolError(f"cannot tell the split of {json_path} from its name; expected "
                             f"instances_<split>.json (e.g. instances_train2014.json) or pass --split")
    return m.group(1)


def load_coco_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LabelToolError(f"annotation file not found: {path}; download annotations_trainval2014 "
                             f"and pass --data-root (holding annotations/) or --annotations")
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise LabelToolError(f"{path} has no '{key}' field; pass an instances_*.json file")
    return data


def coco_annotations_by_image(data: Mapping, include_crowd: bool = True) -> Dict[int, List[Mapping]]:
    """{image id: annotations in file order} (file order matters for mask overwriting)."""
    by_image: Dict[int, List[Mapping]] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    return by_image


def make_coco_labels(data: Mapping, split: str, key_format: str = COCO_KEY_FORMAT,
                     include_crowd: bool = True) -> Dict[str, np.ndarray]:
    """{key: float32 (80,) multi-hot} for the images with >= 1 (counted) annotation, by image id."""
    ranks = coco_category_ranks(data["categories"])
    by_image = coco_annotations_by_image(data, include_crowd)
    labels = {}
    for image_id in sorted(by_image):
        vec = np.zeros(len(ranks), np.float32)
        for ann in by_image[image_id]:
            vec[ranks[int(ann["category_id"])]] = 1.0
        labels[key_format.format(split=split, id=image_id)] = vec
    return labels


def coco_list_path(list_dir, split: str) -> Path:
    """train2014 -> <list_dir>/train.txt (the names of metadata/coco/)."""
    return Path(list_dir) / f"{re.sub(r'[0-9]{4}$', '', split)}.txt"


def check_coco_names(data: Mapping, class_names: Sequence[str], source) -> None:
    # labels.txt writes multi-word names with underscores ("traffic_light"); the JSON uses spaces.
    names = [c["name"].replace(" ", "_") for c in sorted(data["categories"], key=lambda c: int(c["id"]))]
    if len(names) != len(class_names):
        raise LabelToolError(f"{source} has {len(names)} categories but labels.txt has "
                             f"{len(class_names)} classes; use the matching --dataset / --metadata-dir")
    if names != [n.replace(" ", "_") for n in class_names]:
        diff = [(a, b) for a, b in zip(names, class_names) if a != b][:3]
        logger.warning("category names of %s differ from labels.txt (e.g. %s); indices follow the "
                       "sorted category ids regardless", source, diff)


# --------------------------------------------------------------------------------------------
# A spreadsheet (CSV)
# --------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"1", "1.0", "yes", "y", "true", "x"}, {"", "0", "0.0", "no", "n", "false"}
_SEPARATORS = re.compile(r"[;|]|\s+")


def _csv_id(cell: str) -> str:
    """'photos/a.jpg' -> 'a' (the id training looks up as JPEGImages/<id>.jpg)."""
    name = cell.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if re.search(r"\.(jpe?g|png|bmp|tiff?|webp)$", name, re.I) else name


def read_label_csv(path, class_names=None, id_column=None, labels_column=None,
                   split_column="split") -> Tuple[Dict[str, np.ndarray], List[str], Dict[str, List[str]]]:
    """({id: float32 (C,) multi-hot}, class names, {split: ids}) from a CSV (module docstring).

    ``class_names`` None: taken from the CSV. A class name the list does not know, a cell of a
    class column that is not 0/1, or an id on two rows is a LabelToolError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise LabelToolError(f"--csv {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LabelToolError(f"--csv {path}: not UTF-8 text; save the spreadsheet as CSV UTF-8") from None
    # (row number in the file, cells); blank rows dropped
    rows = [(n, r) for n, r in enumerate(csv.reader(text.splitlines()), start=1)
            if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise LabelToolError(f"--csv {path}: needs a header row and one row per image")
    header = [h.strip() for h in rows[0][1]]
    col = {h: k for k, h in enumerate(header)}
    for flag, name in (("--csv-id-column", id_column), ("--csv-labels-column", labels_column)):
        if name is not None and name not in col:
            raise LabelToolError(f"{flag} {name!r} is not a column of {path} ({', '.join(header)})")
    id_k = col[id_column] if id_column is not None else 0
    split_k = col.get(split_column) if split_column else None
    rest = [k for k in range(len(header)) if k not in (id_k, split_k)]
    known = set(class_names or [])
    if labels_column is not None:
        wide = False
    elif class_names is not None:
        wide = len(rest) > 1 or (len(rest) == 1 and header[rest[0]] in known)
    else:
        # One column of nothing but 0/1 cells is the one class of a single-class spreadsheet
        # ("image,cat" / "a.jpg,1"), not the class names "0" and "1".
        cells = [r[rest[0]].strip().lower() for _, r in rows[1:] if len(r) > rest[0]] \
            if len(rest) == 1 else []
        wide = len(rest) > 1 or (any(cells) and all(c in _TRUE | _FALSE for c in cells))
    if not rest:
        raise LabelToolError(f"--csv {path}: no label column besides the id (header: {', '.join(header)})")
    names = list(class_names) if class_names is not None else (
        [header[k] for k in rest] if wide else None)
    entries: List[Tuple[int, str, List[str], str]] = []  # (row number, id, class names, split)
    for n, row in rows[1:]:
        row = row + [""] * (len(header) - len(row))
        img_id = _csv_id(row[id_k])
        if not img_id:
            raise LabelToolError(f"{path}:{n}: empty image name")
        if wide:
            present = []
            for k in rest:
                cell = row[k].strip().lower()
                if cell not in _TRUE | _FALSE:
                    raise LabelToolError(f"{path}:{n}: column {header[k]!r} holds {row[k]!r}; "
                                         f"class columns hold 1 (present) or 0 / empty")
                if cell in _TRUE:
                    present.append(header[k])
        else:
            k = col[labels_column] if labels_column is not None else rest[0]
            present = [t for t in _SEPARATORS.split(row[k].strip()) if t]
        split = (row[split_k].strip() if split_k is not None else "") or "train"
        entries.append((n, img_id, present, split))
    if names is None:
        names = sorted({c for _, _, present, _ in entries for c in present})
        if not names:
            raise LabelToolError(f"--csv {path}: no class name in any row")
    index = {c: i for i, c in enumerate(names)}
    labels: Dict[str, np.ndarray] = {}
    first: Dict[str, int] = {}
    splits: Dict[str, List[str]] = {}
    for n, img_id, present, split in entries:
        unknown = [c for c in present if c not in index]
        if unknown:
            raise LabelToolError(f"{path}:{n}: class {unknown[0]!r} is not in the class list "
                                 f"({', '.join(names)}); fix the row or labels.txt")
        if img_id in labels:
            raise LabelToolError(f"{path}: image {img_id!r} is on rows {first[img_id]} and {n}; "
                                 f"keep one row per image")
        vec = np.zeros(len(names), np.float32)
        vec[[index[c] for c in present]] = 1.0
        labels[img_id], first[img_id] = vec, n
        splits.setdefault(split, []).append(img_id)
    return labels, names, splits


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise LabelToolError(f"{path} exists; pass --overwrite to replace it")


def get_args_parser():
    p = argparse.ArgumentParser("Make image-level labels (image_labels.txt)", add_help=False)
    p.add_argument("--dataset", type=str, default="voc12", choices=sorted(DATASETS),
                   help="voc12/custom: VOC XML annotations; coco: instances_*.json (default voc12)")
    p.add_argument("--data-root", "--data_root", dest="data_root", type=Path, required=True,
                   help="VOC: the folder with Annotations/ (e.g. VOCdevkit/VOC2012); "
                        "COCO: the folder with annotations/instances_{train,val}2014.json")
    p.add_argument("--out", type=Path, required=True, help="output image_labels.txt")
    p.add_argument("--metadata-dir", "--metadata_dir", dest="metadata_dir", type=Path, default=None,
                   help="folder with labels.txt (and the split lists); default: the dataset's metadata/")
    p.add_argument("--lists", type=str, nargs="+", default=None,
                   help="VOC: split names or list files whose ids get labels (published: train_aug val; "
                        "default for voc12; other VOC-layout datasets default to every Annotations/*.xml)")
    p.add_argument("--annotations", type=Path, nargs="+", default=None,
                   help="COCO: instances JSON files (default: <data-root>/annotations/"
                        "instances_train2014.json and instances_val2014.json)")
    p.add_argument("--key-format", type=str, default=COCO_KEY_FORMAT,
                   help=f"COCO: image key pattern with {{split}} and {{id}} (default {COCO_KEY_FORMAT!r}, "
                        f"the EPS lists' ids)")
    p.add_argument("--crowd", type=str, default="include", choices=["include", "exclude"],
                   help="COCO: whether iscrowd annotations count (default include, as the usual "
                        "scripts and the published 82,081/40,137-image lists)")
    p.add_argument("--list-dir", type=Path, default=None,
                   help="COCO: also write <list-dir>/<split>.txt (train.txt, val.txt) with the "
                        "images that have >= 1 annotation; --csv: one <split>.txt per split, "
                        "images without a class moved from the train* lists to no_class.txt")
    p.add_argument("--csv", type=Path, default=None,
                   help="a spreadsheet of image labels instead of annotations: one row per image, "
                        "a column of class names (cat;dog) or one 0/1 column per class "
                        "(docs/custom-data.md)")
    p.add_argument("--csv-id-column", type=str, default=None,
                   help="CSV: the column of image names (default: the first)")
    p.add_argument("--csv-labels-column", type=str, default=None,
                   help="CSV: the column of class names, separated by ; | or spaces (default: "
                        "the only other column)")
    p.add_argument("--csv-split-column", type=str, default="split",
                   help="CSV: a column naming each image's split (train, val ...); with "
                        "--list-dir one <split>.txt per split (default 'split' when present; "
                        "without it, train.txt lists every image)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace existing output files")
    return p


# With --list-dir, images whose row names no class leave the training lists (splits whose name
# starts with "train": train, train_aug, trainval) for this one, beside them: EPS's classifier and
# its CAM masking need >= 1 class per image (docs/data.md), while infer.py --labels predicted can
# still make their pseudo-masks. Evaluation splits (val ...) keep them: an all-background image
# is a fair test image.
NO_CLASS_LIST = "no_class"


def is_training_split(split: str) -> bool:
    return split.startswith("train")


def split_no_class(splits: Mapping[str, Sequence[str]], empty: Iterable[str]
                   ) -> Tuple[Dict[str, List[str]], List[str]]:
    """({split: ids}, ids taken out): the images without a class leave the training splits."""
    empty = set(empty)
    kept = {s: [i for i in ids if not (is_training_split(s) and i in empty)] for s, ids in splits.items()}
    out = [i for s, ids in splits.items() if is_training_split(s) for i in ids if i in empty]
    return kept, out


def main_csv(args) -> Dict[str, np.ndarray]:
    """--csv: labels (and, when absent, labels.txt; with --list-dir, the split lists)."""
    from data.metadata import read_class_names, write_class_names
    meta = args.metadata_dir or (args.data_root if args.dataset == "custom"
                                 else DATASETS[args.dataset].metadata_dir)
    known = Path(meta) / "labels.txt" if meta is not None else None
    class_names = read_class_names(known)[1:] if known is not None and known.is_file() else None
    _refuse_overwrite(args.out, args.overwrite)
    labels, names, splits = read_label_csv(args.csv, class_names, args.csv_id_column,
                                           args.csv_labels_column, args.csv_split_column)
    empty = [k for k, v in labels.items() if not v.any()]
    if NO_CLASS_LIST in splits:
        raise LabelToolError(f"--csv {args.csv}: a split is named '{NO_CLASS_LIST}', the list "
                             f"that --list-dir writes for images without a class; rename it")
    splits, no_class = split_no_class(splits, empty)
    if no_class:
        splits[NO_CLASS_LIST] = no_class
    outputs = []
    if class_names is None:
        outputs.append(("labels", args.out.parent / "labels.txt"))
    if args.list_dir is not None:
        outputs += [("list", Path(args.list_dir) / f"{split}.txt") for split in splits]
    for _, path in outputs:
        _refuse_overwrite(path, args.overwrite)
    if empty and args.list_dir is not None:
        logger.warning("%d images have no class (e.g. %s); they are written without indices; %d of "
                       "them left the training lists for %s (infer.py --labels predicted --infer_list "
                       "%s makes their pseudo-masks)", len(empty), empty[:3], len(no_class),
                       Path(args.list_dir) / f"{NO_CLASS_LIST}.txt", NO_CLASS_LIST)
    elif empty:
        logger.warning("%d images have no class (e.g. %s); they are written without indices: leave "
                       "them out of training lists (--list-dir does that)", len(empty), empty[:3])
    header = (f"image_id followed by the 0-based indices of the classes present "
              f"(0={names[0]} ... {len(names) - 1}={names[-1]})\n"
              f"made by tools/make_cls_labels.py from {args.csv}")
    write_image_labels(args.out, labels, header)
    for kind, path in outputs:
        if kind == "labels":
            write_class_names(path, ["background", *names])
            logger.info("wrote %s (%d classes, from the CSV)", path, len(names))
        else:
            write_id_list(path, splits[path.stem])
            logger.info("wrote %s (%d ids)", path, len(splits[path.stem]))
    logger.info("wrote %s (%d images, %d classes)", args.out, len(labels), len(names))
    return labels


def main(args) -> Dict[str, np.ndarray]:
    if args.csv is not None:
        return main_csv(args)
    info = get_dataset(args.dataset, metadata_dir=args.metadata_dir, data_root=args.data_root)
    class_names = info.class_names
    _refuse_overwrite(args.out, args.overwrite)
    if args.dataset == "coco":
        files = args.annotations or [args.data_root / "annotations" / f"instances_{s}2014.json"
                                     for s in ("train", "val")]
        splits = [coco_split_of(p) for p in files]
        if args.list_dir is not None:  # check before the (slow) JSON parsing
            for split in splits:
                _refuse_overwrite(coco_list_path(args.list_dir, split), args.overwrite)
        labels: Dict[str, np.ndarray] = {}
        lists: List[Tuple[Path, List[str]]] = []
        for path, split in zip(files, splits):
            data = load_coco_json(path)
            check_coco_names(data, class_names, path)
            part = make_coco_labels(data, split, args.key_format, args.crowd == "include")
            logger.info("%s: %d of %d images have >= 1 annotation", path.name, len(part), len(data["images"]))
            labels.update(part)
            if args.list_dir is not None:
                lists.append((coco_list_path(args.list_dir, split), list(part)))
        source = ", ".join(p.name for p in files) + f" (crowd annotations {args.crowd}d)"
    else:
        ann_dir = args.data_root / "Annotations"
        if args.lists:
            ids = list(dict.fromkeys(i for name in args.lists for i in info.read_ids(name)))
        elif args.dataset == "voc12":
            ids = list(dict.fromkeys(info.read_ids("train_aug") + info.read_ids("val")))
        else:
            ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
            if not ids:
                raise LabelToolError(f"no XML files in {ann_dir}; check --data-root")
        labels = make_voc_labels(ann_dir, ids, class_names)
        source = f"{ann_dir} (every <name> that is a class; difficult/truncated included)"
    # (COCO's --list-dir lists hold only images with >= 1 annotation: never one without a class)
    empty = [k for k, v in labels.items() if not v.any()]
    if empty:
        logger.warning("%d images have no class (e.g. %s); they are written without indices: leave "
                       "them out of training lists", len(empty), empty[:3])
    header = (f"image_id followed by the 0-based indices of the classes present "
              f"(0={class_names[0]} ... {len(class_names) - 1}={class_names[-1]})\n"
              f"made by tools/make_cls_labels.py from {source}")
    write_image_labels(args.out, labels, header)
    for list_path, ids in lists if args.dataset == "coco" else []:
        write_id_list(list_path, ids)
        logger.info("wrote %s (%d ids)", list_path, len(ids))
    logger.info("wrote %s (%d images)", args.out, len(labels))
    return labels


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
