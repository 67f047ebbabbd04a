"""How good are these saliency maps for EPS? Scores a folder of maps against the ground truth's
foreground (every pixel that is neither background nor ignore) on any list with masks.

    python tools/eval_saliency.py --data-root my_data --list train
    python tools/eval_saliency.py --dataset voc12 --data-root $VOC --list val \\
        --maps $VOC/SALImages_u2net            # next to PFAN's $VOC/SALImages when present

It prints, for each folder of maps (the salient-object metrics; conventions in eval/saliency.py):
MAE, max F-beta (beta^2 = 0.3, 256 thresholds) and the F-beta at EPS's own threshold (the loss
rounds v / 255, so v >= 128 is salient), with precision and recall there; then the share of each
class's pixels that the maps call salient, flagging every class the saliency does not cover
(under tau, EPS pushes it into the background: it cannot be learned), every object of which less
than --miss-below is salient, and the images with salient regions where the ground truth has no
object. ``--out report.md`` also writes the report, ``report.json`` (every figure, per image
too) and ``report_per_image.csv``. docs/custom-data.md says what to look at before training.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from data.errors import DataError  # noqa: E402
from data.pixels import saliency_to_8bit  # noqa: E402
from data.registry import DATASETS, check_data_root, dataset_root_of, get_dataset  # noqa: E402
from data.saliency import OTHER_ASPECT, SAME, size_kind  # noqa: E402
from eval.saliency import (EPS_SALIENT_MIN, MISS_BELOW, ImageScores, SaliencySummary,  # noqa: E402
                           image_scores, summarize)
from utils import flags  # noqa: E402
from utils.cli import add_flag, parent_parser, run_cli  # noqa: E402
from utils.errors import UserError, examples  # noqa: E402
from utils.io import atomic_write_text  # noqa: E402
from utils.progress import Progress  # noqa: E402
from tools.make_saliency import RECORD_NAME  # noqa: E402  (the record beside the maps)

logger = logging.getLogger("eval_saliency")


class SaliencyEvalError(UserError):
    """Bad input; the message names the file or flag and the fix."""


# ------------------------------------------------------------------------------------------------
# reading (as training reads the maps: data/pixels.py, data/saliency.py)
# ------------------------------------------------------------------------------------------------
def read_map(path, size: Tuple[int, int]) -> np.ndarray:
    """An 8-bit map at ``size`` (W, H) of its ground truth: read at its real bit depth; a map at
    another resolution with the same aspect ratio is resized (bicubic, as the training transform
    resizes it); another aspect ratio is refused, as training refuses it."""
    try:
        with Image.open(path) as f:
            f.load()
            img = saliency_to_8bit(f, path)
    except DataError as e:
        raise SaliencyEvalError(str(e)) from None
    except FileNotFoundError:
        raise SaliencyEvalError(f"saliency map not found: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise SaliencyEvalError(f"cannot read saliency map {path} ({e})") from None
    kind = size_kind(size, img.size)
    if kind == OTHER_ASPECT:
        raise SaliencyEvalError(f"saliency map {path} is {img.size[0]}x{img.size[1]} but its "
                                f"ground truth is {size[0]}x{size[1]}: another aspect ratio, "
                                f"which training refuses too; regenerate the map from its image")
    if img.mode != "L":
        img = img.convert("RGB")  # as the training transform; then the channel mean, as EPS
        arr = np.asarray(img, dtype=np.float64).mean(axis=2)
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if kind != SAME:
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def read_gt(path) -> np.ndarray:
    from eval.evaluator import EvalError, read_label_png
    try:
        return read_label_png(path)
    except EvalError as e:
        raise SaliencyEvalError(str(e)) from None


def score_one(job: Tuple[str, str, str]) -> ImageScores:
    img_id, map_path, gt_path = job
    gt = read_gt(gt_path)
    sal = read_map(map_path, (gt.shape[1], gt.shape[0]))
    return image_scores(img_id, sal, gt)


def score_folder(jobs: Sequence[Tuple[str, str, str]], workers: int, desc: str,
                 progress: bool) -> List[ImageScores]:
    bar = Progress(len(jobs), desc, unit="img", enabled=progress)
    out: List[ImageScores] = []
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                out.append(score_one(job))
                bar.update(1)
        else:
            from utils.workers import mp_pool
            with mp_pool(workers) as pool:
                for s in pool.imap(score_one, jobs, chunksize=16):
                    out.append(s)
                    bar.update(1)
    finally:
        bar.close()
    return out


def model_of(folder: Path) -> str:
    """What made a folder of maps, from make_saliency.py's record, or 'unknown'."""
    try:
        rec = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        return f"{rec.get('model')} ({rec.get('postprocess')})"
    except (OSError, ValueError):
        return "no record (e.g. downloaded maps)"


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_report(results: Sequence[Tuple[str, Path, SaliencySummary]], list_name: str,
                  gt_dir: str) -> str:
    """The markdown report: the metrics of every folder, then the first folder's coverage by
    class (with the others' coverage beside it), its missed objects and spurious regions."""
    name0, _, main = results[0]
    lines = [f"# Saliency maps vs ground truth: {list_name} ({main.num_images} images, "
             f"{main.num_scored} with foreground; ground truth {gt_dir})", "",
             "| maps | made by | MAE | max F (at t) | F at EPS's 0.5 | precision / recall at 0.5 "
             "| images with spurious regions |",
             "|---|---|---|---|---|---|---|"]
    for name, folder, s in results:
        lines.append(f"| {name} | {model_of(folder)} | {_num(s.mae)} | {_num(s.max_f)} "
                     f"({s.max_f_threshold}) | {_num(s.f_eps)} | {_num(s.precision_eps)} / "
                     f"{_num(s.recall_eps)} | {len(s.spurious_images)} |")
    lines += ["", f"MAE: mean |map/255 - foreground| (0 is best); F: F-beta with beta^2 = 0.3; "
              f"max F: best of 256 thresholds; EPS's 0.5: pixels >= {EPS_SALIENT_MIN} are salient "
              f"for the EPS loss. Ignore pixels (255) are left out.", ""]
    others = results[1:]
    head = "| class | images | salient share of its pixels | " + "".join(
        f"{n} | " for n, _, _ in others) + f"objects < {main.miss_below:.0%} salient | " \
        f"objects < tau {main.tau:g} | |"
    lines += [f"## Coverage by class ({name0})", "",
              "EPS keeps a present class in the foreground only where its CAM overlaps the "
              f"salient region by more than tau ({main.tau:g}); a class the maps do not cover is "
              "pushed into the background and cannot be learned.", "", head,
              "|" + "---|" * (head.count("|") - 1)]
    other_cov = [{c.name: c for c in s.classes} for _, _, s in others]
    for c in main.classes:
        if not c.pixels:
            flag = "not in this list"
        elif c.coverage < main.tau:
            flag = "**NOT COVERED: EPS cannot learn this class from these maps**"
        elif c.below_tau > c.images / 2:
            flag = "**mostly below tau: EPS will push it into the background**"
        elif c.missed:
            flag = f"{c.missed} objects partly missed"
        else:
            flag = ""
        extra = "".join(f"{_pct(o[c.name].coverage)} | " for o in other_cov)
        lines.append(f"| {c.name} | {c.images} | {_pct(c.coverage)} | {extra}{c.missed} | "
                     f"{c.below_tau} | {flag} |")
    n_obj = sum(c.images for c in main.classes)
    lines += ["", f"## Missed objects ({name0}): {len(main.missed)} of {n_obj} objects have less "
              f"than {main.miss_below:.0%} of their pixels salient", ""]
    if main.missed:
        lines.append("worst: " + ", ".join(f"{i} {n} {cov:.0%}" for i, n, cov in main.missed[:15])
                     + (" ..." if len(main.missed) > 15 else ""))
    lines += ["", f"## Spurious salient regions ({name0}): {len(main.spurious_images)} of "
              f"{main.num_images} images have salient regions that touch no ground-truth object "
              f"(false detections, or stuff the model calls salient)", ""]
    if main.spurious_images:
        lines.append("largest share of the salient area: " + ", ".join(
            f"{i} {share:.0%}" for i, _, share in main.spurious_images[:10])
            + (" ..." if len(main.spurious_images) > 10 else ""))
    return "\n".join(lines) + "\n"


def per_image_csv(scores: Sequence[ImageScores], class_names: Sequence[str],
                  miss_below: float) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "mae", "max_f", "f_eps", "precision_eps", "recall_eps", "fg_pixels",
                "salient_pixels", "spurious_regions", "spurious_pixels", "missed_objects"])
    for s in scores:
        missed = [f"{class_names[c - 1]}:{s.coverage(c):.2f}" for c in sorted(s.classes)
                  if s.coverage(c) < miss_below]
        w.writerow([s.id, _num(s.mae, 4), _num(s.max_f, 4), _num(s.f_eps, 4),
                    _num(s.precision_eps, 4), _num(s.recall_eps, 4), s.fg_pixels,
                    s.salient_pixels, s.spurious, s.spurious_pixels, " ".join(missed)])
    return buf.getvalue()


def summary_json(results, scores0: Sequence[ImageScores], class_names) -> Dict:
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    out = {"maps": []}
    for name, folder, s in results:
        d = asdict(s)
        for c, cc in zip(d["classes"], s.classes):
            c["coverage"] = cc.coverage
        out["maps"].append({"name": name, "folder": str(folder), "made_by": model_of(folder),
                            **d})
    out["per_image"] = [{k: v for k, v in asdict(s).items() if k not in ("f_curve", "classes")}
                        | {"coverage": {class_names[c - 1]: s.coverage(c) for c in sorted(s.classes)}}
                        for s in scores0]
    return clean(out)


# ------------------------------------------------------------------------------------------------
# the tool
# ------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("Score saliency maps against the ground truth")
    flags.add_data_root(p, help="dataset root (the folder holding JPEGImages/ and the ground "
                                "truth)")
    add_flag(p, "--list", type=str, required=True,
             help="id list with ground-truth masks: a split name (e.g. train, val) or a file")
    flags.add_dataset(p, DATASETS, default="custom",
                      help="dataset layout and class names (default custom: the VOC layout with "
                           "labels.txt in the root)")
    flags.add_metadata_dir(p)
    add_flag(p, "--maps", type=Path, default=None,
             help="folder of <id>.png maps to score (default: <data root>/SALImages)")
    add_flag(p, "--name", type=str, default=None,
             help="name of --maps in the report (default: the folder's name)")
    add_flag(p, "--compare", type=str, action="append", default=[],
             help="another folder of maps to put beside them, NAME=DIR or DIR (repeatable). With "
                  "--dataset voc12 or coco, PFAN's <data root>/SALImages is added by itself when "
                  "present and not --maps (the paper's maps)")
    add_flag(p, "--auto-compare", action=argparse.BooleanOptionalAction, default=True,
             help="add PFAN's maps on voc12 / coco when present (see --compare)")
    add_flag(p, "--gt-dir", type=Path, default=None,
             help="ground-truth folder (default: SegmentationClassAug/ or SegmentationClass/ of "
                  "the data root)")
    add_flag(p, "--tau", type=float, default=None,
             help="EPS's overlap threshold for the coverage flags (default: the EPS head's "
                  "value for the dataset, network/heads.py; paper: 0.4)")
    add_flag(p, "--miss-below", type=float, default=MISS_BELOW,
             help=f"report an object when less than this share of its pixels is salient "
                  f"(default {MISS_BELOW})")
    flags.add_skip_missing(p, "map or mask")
    add_flag(p, "--out", type=Path, default=None,
             help="also write the report here (markdown), with <stem>.json and "
                  "<stem>_per_image.csv beside it")
    flags.add_overwrite(p, "replace an existing --out report and its .json and .csv")
    add_flag(p, "--workers", type=int, default=None,
             help="reader processes (default: min(4, cores))")
    add_flag(p, "--progress", action=argparse.BooleanOptionalAction, default=True,
             help="progress bar on a terminal, a log line every 10 s elsewhere")
    return p


def _folders(args, root: Path, spec_dir: str) -> List[Tuple[str, Path, bool]]:
    """[(name, folder, required)]: --maps first, then --compare, then PFAN's when automatic."""
    maps = args.maps if args.maps is not None else root / spec_dir
    out = [(args.name or maps.name, maps, True)]
    for item in args.compare:
        name, sep, folder = item.partition("=")
        folder = Path(folder if sep else name)
        out.append((name if sep else folder.name, folder, True))
    pfan = root / spec_dir
    if args.auto_compare and args.dataset in ("voc12", "coco") and pfan.is_dir() \
            and all(f.resolve() != pfan.resolve() for _, f, _ in out):
        out.append(("PFAN", pfan, False))
    return out


def output_paths(out: Path) -> Tuple[Path, Path, Path]:
    """--out (the markdown report) and the two files written beside it: <stem>.json (every
    figure) and <stem>_per_image.csv."""
    stem = out.with_suffix("")
    return out, Path(f"{stem}.json"), Path(f"{stem}_per_image.csv")


def check_outputs(out: Path, overwrite: bool) -> None:
    """Every file --out writes: none a folder, none replaced without --overwrite (a finished
    report's .json is as much a result as its .md), all writable."""
    paths = output_paths(out)
    if len(set(paths)) < len(paths):
        raise SaliencyEvalError(f"--out {out}: the JSON summary is written beside the report as "
                                f"{paths[1]}; name the report with another ending, e.g. "
                                f"{out.with_suffix('.md')}")
    for p in paths:
        if p.is_dir():
            raise SaliencyEvalError(f"--out {out}: {p} is a folder; pass another file name"
                                    + (f" such as {out / 'report.md'}" if p == out else ""))
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SaliencyEvalError(f"--out {out}: {', '.join(existing)} exist(s) (a finished "
                                f"report); pass --overwrite to replace them, or another --out")
    from utils.run import check_writable
    check_writable(out.parent, "--out")


def main(args) -> Dict:
    if not 0 < args.miss_below <= 1:
        raise SaliencyEvalError(f"--miss-below {args.miss_below} must be in (0, 1]")
    if args.tau is not None and not 0 <= args.tau <= 1:
        raise SaliencyEvalError(f"--tau {args.tau} must be in [0, 1]")
    if args.workers is not None and args.workers < 1:
        raise SaliencyEvalError(f"--workers {args.workers} must be >= 1")
    check_data_root(args.data_root, "--data-root")
    info = get_dataset(args.dataset, args.metadata_dir, args.data_root)
    root = dataset_root_of(args.data_root)
    ids = info.read_ids(args.list)
    tau = args.tau
    if tau is None:  # the EPS head owns its recipe (network/heads.py); torch only in this case
        from network.heads import EpsHead
        tau = float(EpsHead.hparams["tau"].default_for(info.name))
    if args.out is not None:  # before any map is scored, not at the first write
        check_outputs(args.out, args.overwrite)

    gt = {i: (args.gt_dir / f"{i}.png" if args.gt_dir is not None else info.gt_path(root, i))
          for i in ids}
    folders = _folders(args, root, info.spec.saliency_dir)
    problems, dropped, usable = [], set(), []
    no_gt = [f"{i} ({p})" for i, p in gt.items() if not p.is_file()]
    if no_gt:
        (dropped.update(i for i, p in gt.items() if not p.is_file()) if args.skip_missing
         else problems.append(f"{len(no_gt)} of {len(ids)} ids have no ground-truth mask "
                              f"({examples(no_gt)}): evaluate a list with masks, or pass "
                              f"--gt-dir"))
    for name, folder, required in folders:
        if not folder.is_dir():
            if required:
                problems.append(f"maps folder {folder} not found (make the maps with "
                                f"tools/make_saliency.py)")
            continue
        absent = [i for i in ids if not (folder / f"{i}.png").is_file()]
        if absent and not required:
            logger.warning("%s (%s) lacks %d of the %d maps: left out of the report", name,
                           folder, len(absent), len(ids))
            continue
        if absent and not args.skip_missing:
            problems.append(f"{len(absent)} of {len(ids)} ids have no map in {folder} "
                            f"({examples(absent)}): make them (tools/make_saliency.py) or pass "
                            f"--skip-missing")
        dropped.update(absent)
        usable.append((name, folder))
    if problems:
        raise SaliencyEvalError("; ".join(problems))
    keep = [i for i in ids if i not in dropped]
    if dropped:
        logger.warning("left out %d of %d ids without a map or mask (first: %s)", len(dropped),
                       len(ids), examples(sorted(dropped)))
    if not keep:
        raise SaliencyEvalError("no id of the list has both a map and a mask")

    workers = args.workers or min(4, os.cpu_count() or 1)
    results, scores0 = [], None
    for name, folder in usable:
        jobs = [(i, str(folder / f"{i}.png"), str(gt[i])) for i in keep]
        scores = score_folder(jobs, workers, f"score {name}", args.progress)
        scores0 = scores if scores0 is None else scores0
        results.append((name, folder, summarize(scores, info.class_names, args.miss_below, tau)))

    gt_dir = str(args.gt_dir) if args.gt_dir is not None else str(gt[keep[0]].parent)
    report = format_report(results, Path(str(args.list)).stem, gt_dir)
    print(report, flush=True)
    main_summary = results[0][2]
    for c in main_summary.uncovered_classes():
        logger.warning("class %s: only %s of its pixels are salient (tau %g): EPS cannot learn it "
                       "from %s", c.name, _pct(c.coverage), tau, results[0][1])
    if args.out is not None:
        md_path, json_path, csv_path = output_paths(args.out)
        atomic_write_text(md_path, report)
        atomic_write_text(json_path, json.dumps(summary_json(results, scores0, info.class_names),
                                                indent=1) + "\n")
        atomic_write_text(csv_path, per_image_csv(scores0, info.class_names, args.miss_below))
        logger.info("wrote %s, %s and %s", md_path, json_path, csv_path)
    return {"results": results, "scores": scores0, "report": report}


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
