"""Validate a dataset root before a multi-hour run.

For every id of a list it checks: the image exists, its header reads and its pixel format has an
exact 8-bit reading; the saliency map (with ``--saliency-root``) exists, has such a format and
the image's aspect ratio; the image labels exist and hold at least one class; the GT mask (with
``--gt``) exists and has the image's size. Sizes come from the file headers (PIL opens lazily), so
a VOC train_aug check takes seconds; ``--decode`` also decodes every image to catch truncated files.

Warnings do not fail the check: saliency maps at another resolution than their image with its
aspect ratio (training resizes them to the image, as published), 16-bit grayscale files (read at
full depth), and, with ``--stretch-saliency``, maps with another aspect ratio (stretched to the
image when training with the same flag). The rules are data/saliency.py and data/pixels.py.

    python tools/check_dataset.py --dataset voc12 --data-root VOCdevkit/VOC2012 \\
        --saliency-root VOCdevkit/VOC2012/SALImages --list train_aug
    python tools/check_dataset.py --dataset voc12 --data-root VOCdevkit/VOC2012 --list train --gt

Prints a summary table (ok count and each problem with its first files), then one WARNING line
per kind of warning (count and first ids), and exits with status 1 when anything is wrong, 0
otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.metadata import MetadataError  # noqa: E402
from data.pixels import (PixelFormatError, image_to_8bit, is_sixteen_bit,  # noqa: E402
                         saliency_to_8bit)
from data.errors import DataError  # noqa: E402
from data.registry import (DATASETS, DatasetInfo, check_data_root, dataset_root_of,  # noqa: E402
                           get_dataset)
from data.saliency import OTHER_ASPECT, RESCALED, size_kind  # noqa: E402
from utils.cli import run_cli  # noqa: E402

logger = logging.getLogger(__name__)


def saliency_path(saliency_root, img_id: str) -> Path:
    # Same rule as data.datasets.saliency_path, repeated so this check does not import torch.
    return Path(saliency_root) / f"{img_id}.png"

CHECKS = ("list", "image", "saliency", "labels", "gt")

# Warnings (they do not fail the check).
W_RESCALED = ("maps at another resolution than their image, same aspect ratio: resized to the "
              "image's size when training (the published result)")
W_STRETCHED = ("maps with another aspect ratio than their image: stretched to it when training "
               "with --stretch-saliency (a deviation; the published code would misalign them)")
W_SIXTEEN = "16-bit grayscale files: read at full depth, round(v / 257)"
P_ASPECT = "aspect ratio differs from image"


@dataclass
class CheckReport:
    """ok[check] = ids that passed; problems[(check, problem)] = offending files / ids;
    warnings[(check, note)] = ids that passed with a note."""
    title: str
    num_ids: int
    checks: List[str]
    ok: Counter = field(default_factory=Counter)
    problems: Dict[Tuple[str, str], List[str]] = field(default_factory=dict)
    bad_ids: set = field(default_factory=set)
    warnings: Dict[Tuple[str, str], List[str]] = field(default_factory=dict)

    def add(self, check: str, problem: str, img_id: str, detail: str) -> None:
        self.problems.setdefault((check, problem), []).append(detail)
        self.bad_ids.add(img_id)

    def warn(self, check: str, note: str, detail: str) -> None:
        self.warnings.setdefault((check, note), []).append(detail)

    @property
    def passed(self) -> bool:
        return not self.problems

    def format(self, show: int = 3) -> str:
        lines = [self.title, "",
                 "| check | ok | problem | count | first files |", "|---|---|---|---|---|"]
        for check in self.checks:
            rows = [(p, files) for (c, p), files in self.problems.items() if c == check]
            if not rows:
                lines.append(f"| {check} | {self.ok[check]} | - | 0 | |")
            for problem, files in rows:
                first = ", ".join(files[:show]) + (", ..." if len(files) > show else "")
                lines.append(f"| {check} | {self.ok[check]} | {problem} | {len(files)} | {first} |")
        lines.append("")
        for (check, note), ids in self.warnings.items():
            first = ", ".join(ids[:show]) + (", ..." if len(ids) > show else "")
            lines.append(f"WARNING: {check}: {len(ids)} {note} (first: {first})")
        if self.warnings:
            lines.append("")
        if self.passed:
            lines.append(f"OK: all {self.num_ids} ids passed"
                         + (" (with the warnings above)" if self.warnings else ""))
        else:
            lines.append(f"PROBLEMS: {len(self.bad_ids)} of {self.num_ids} ids have problems; fix "
                         f"them, or train with --skip-missing to drop ids with missing files")
            if ("saliency", P_ASPECT) in self.problems:
                lines.append("saliency maps with another aspect ratio than their image: regenerate "
                             "them from their images, or stretch them to the image with "
                             "--stretch-saliency (here and in train.py; a deviation from the "
                             "published code, which would misalign them)")
            if self.ok["image"] == 0 and "image" in self.checks:
                lines.append("no image was found at all: is --data-root the dataset root (the folder "
                             "holding JPEGImages/, or train2014/ for COCO)?")
        return "\n".join(lines)


def read_size(path: Path, decode: bool = False,
              to_8bit=None) -> Tuple[Optional[Tuple[int, int]], Optional[str], str]:
    """((w, h), None, note) or (None, 'missing' | 'unreadable' | 'unsupported pixel format',
    detail). ``to_8bit`` (data/pixels.py) checks the pixel format as the loaders will: header
    only for 8-bit files; note = 'sixteen' when it reads the file as 16-bit grayscale."""
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            note = ""
            if to_8bit is not None:
                to_8bit(img, path)
                note = "sixteen" if is_sixteen_bit(img) else ""
            return img.size, None, note
    except FileNotFoundError:
        return None, "missing", ""
    except PixelFormatError as e:
        return None, "unsupported pixel format", e.reason
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None, "unreadable", ""


def _size_text(size, ref) -> str:
    return f"{size[0]}x{size[1]} vs {ref[0]}x{ref[1]}"


def _check_files(img_id: str, info: DatasetInfo, data_root: Path, saliency_root: Optional[Path],
                 gt: bool, gt_dir: Optional[Path], decode: bool,
                 stretch: bool = False) -> List[Tuple[str, str, str, str]]:
    """(check, level, problem or warning note, detail) rows for the file checks of one id;
    level is 'ok', 'problem' or 'warning' (a warning row comes with an 'ok' row)."""
    out = []

    def file_row(check, path, err, detail):
        if err is None:
            out.append((check, "ok", "", str(path)))
        else:
            out.append((check, "problem", err, f"{path} ({detail})" if detail else str(path)))

    img_path = info.image_path(data_root, img_id)
    size, err, note = read_size(img_path, decode, image_to_8bit)
    file_row("image", img_path, err, note if err else "")
    if note == "sixteen":
        out.append(("image", "warning", W_SIXTEEN, img_id))
    if saliency_root is not None:
        path = saliency_path(saliency_root, img_id)
        sal_size, err, note = read_size(path, decode, saliency_to_8bit)
        kind = size_kind(size, sal_size) if err is None and size is not None else None
        if kind == OTHER_ASPECT and not stretch:
            out.append(("saliency", "problem", P_ASPECT,
                        f"{path} ({_size_text(sal_size, size)})"))
        else:
            file_row("saliency", path, err, note if err else "")
        if note == "sixteen":
            out.append(("saliency", "warning", W_SIXTEEN, img_id))
        if kind == RESCALED or (kind == OTHER_ASPECT and stretch):
            out.append(("saliency", "warning", W_RESCALED if kind == RESCALED else W_STRETCHED,
                        f"{img_id} ({_size_text(sal_size, size)})"))
    if gt:
        path = gt_dir / f"{img_id}.png" if gt_dir else info.gt_path(dataset_root_of(data_root), img_id)
        gt_size, err, _ = read_size(path, decode)
        if err is None and size is not None and gt_size != size:
            out.append(("gt", "problem", "size differs from image",
                        f"{path} ({_size_text(gt_size, size)})"))
        else:
            file_row("gt", path, err, "")
    return out


def check_dataset(info: DatasetInfo, data_root, ids: Sequence[str], *, saliency_root=None,
                  gt: bool = False, gt_dir=None, labels: bool = True, decode: bool = False,
                  workers: int = 8, title: str = "", stretch: bool = False) -> CheckReport:
    data_root = Path(data_root)
    saliency_root = Path(saliency_root) if saliency_root is not None else None
    gt_dir = Path(gt_dir) if gt_dir is not None else None
    checks = ["list", "image"] + (["saliency"] if saliency_root else []) + \
        (["labels"] if labels else []) + (["gt"] if gt else [])
    report = CheckReport(title or f"{info.name}: {len(ids)} ids under {data_root}", len(ids), checks)

    seen = Counter(ids)
    for img_id, n in seen.items():
        if n > 1:
            report.add("list", "duplicate id", img_id, f"{img_id} (x{n})")
    report.ok["list"] = sum(1 for n in seen.values() if n == 1)

    if labels:
        try:
            table = info.image_labels
        except MetadataError as e:
            table = None
            for img_id in ids:
                report.add("labels", "labels file unreadable", img_id, str(e))
        if table is not None:
            where = info.metadata_dir / "image_labels.txt"
            for img_id in ids:
                vec = table.get(img_id)
                if vec is None:
                    report.add("labels", f"no labels in {where}", img_id, img_id)
                elif not vec.any():
                    report.add("labels", "image with no class", img_id, img_id)
                else:
                    report.ok["labels"] += 1

    def job(img_id):
        return img_id, _check_files(img_id, info, data_root, saliency_root, gt, gt_dir, decode,
                                    stretch)

    bar = dict(total=len(ids), desc="checking", unit="id", disable=len(ids) < 1000)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:  # header reads are I/O bound: threads suffice
            results = list(tqdm(pool.map(job, ids), **bar))
    else:
        results = [job(i) for i in tqdm(ids, **bar)]
    for img_id, rows in results:
        for check, level, what, detail in rows:
            if level == "problem":
                report.add(check, what, img_id, detail)
            elif level == "warning":
                report.warn(check, what, detail)
            else:
                report.ok[check] += 1
    return report


def get_args_parser():
    p = argparse.ArgumentParser("Check a dataset root", add_help=False)
    p.add_argument("--dataset", type=str, default="voc12", choices=sorted(DATASETS),
                   help="dataset name (default voc12)")
    p.add_argument("--data-root", "--data_root", dest="data_root", type=Path, required=True,
                   help="dataset root (or its JPEGImages folder, as the published --data_root)")
    p.add_argument("--saliency-root", "--saliency_root", dest="saliency_root", type=Path, default=None,
                   help="folder of <id>.png saliency maps to check (EPS: the PFAN maps, e.g. SALImages)")
    p.add_argument("--stretch-saliency", action=argparse.BooleanOptionalAction, default=False,
                   help="report saliency maps with another aspect ratio than their image as a "
                        "warning (train.py --stretch-saliency stretches them) instead of a problem; "
                        "published: no such option (default off)")
    p.add_argument("--list", type=str, default=None,
                   help="split name or list file (default: the dataset's training list, "
                        "train_aug for voc12 and train for coco)")
    p.add_argument("--metadata-dir", "--metadata_dir", dest="metadata_dir", type=Path, default=None,
                   help="folder with labels.txt, image_labels.txt and lists (default: metadata/<dataset>; "
                        "for custom: the dataset root)")
    p.add_argument("--gt", action=argparse.BooleanOptionalAction, default=False,
                   help="also check the GT masks (SegmentationClassAug / "
                                                     "SegmentationClass) exist and match the image size")
    p.add_argument("--gt-dir", type=Path, default=None, help="GT folder (implies --gt; default: the dataset's)")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="check that every id has image labels with >= 1 class (default on)")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=False,
                   help="fully decode every file (catches truncated images; slower)")
    p.add_argument("--workers", type=int, default=8, help="threads reading file headers (default 8)")
    p.add_argument("--show", type=int, default=3, help="offending files listed per problem (default 3)")
    return p


def main(args) -> CheckReport:
    if args.workers < 1:
        raise DataError(f"--workers {args.workers} must be >= 1")
    check_data_root(args.data_root, "--data-root")
    info = get_dataset(args.dataset, metadata_dir=args.metadata_dir, data_root=args.data_root)
    list_name = args.list or info.train_defaults.get("train_list", "train")
    ids = info.read_ids(list_name, keep_duplicates=True)  # the check reports repeats itself
    report = check_dataset(info, args.data_root, ids, saliency_root=args.saliency_root,
                           gt=args.gt or args.gt_dir is not None, gt_dir=args.gt_dir,
                           labels=args.labels, decode=args.decode, workers=args.workers,
                           stretch=args.stretch_saliency, title=f"{info.name} list {list_name}: {len(ids)} ids under {args.data_root}")
    print(report.format(args.show))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__, exit_code=lambda r: 0 if r.passed else 1))
