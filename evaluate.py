"""Evaluate pseudo-masks / segmentation PNGs (mIoU), or saved CAMs over a threshold sweep.

The published command works with only the script name changed::

    python evaluate.py --dataset voc12 --datalist metadata/voc12/train.txt \\
        --gt_dir $VOC/SegmentationClassAug --pred_dir $OUT/result/png --save_path $OUT/train_miou.txt

CAM threshold sweep (prints the mIoU curve and the best threshold)::

    python evaluate.py --dataset voc12 --datalist train --data-root $VOC \\
        --cam-dir $OUT/result/cam --thr-range 0.05 0.60 0.05

Differences from ``evaluate_png.py`` (each one is deliberate; see the README):
* a prediction whose size differs from its GT is an error (published: silently cropped);
* a prediction value >= num_classes (e.g. 255) counts as wrong (published: the pixel is dropped;
  ``--published-ignore-invalid`` restores that); on valid predictions the numbers are identical;
* an existing result file is not overwritten without ``--overwrite``; a JSON file with every
  metric is written next to the text table.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from data.registry import DATASETS, check_data_root, dataset_root_of, get_dataset
from eval.cam_sweep import evaluate_cams, format_sweep, thresholds_from_range
from eval.evaluator import (EvalError, default_workers, evaluate_folders, paths_in_dir,
                            resolve_gt_paths)
from eval.metrics import compute_scores, format_summary, format_table, scores_to_json
from utils import flags, provenance
from utils.cli import add_flag, parent_parser, run_cli
from utils.io import atomic_write_text, remove_stale_temps
from utils.errors import UserError
from utils.run import check_writable

logger = logging.getLogger("evaluate")

DEFAULT_THR_RANGE = (0.05, 0.95, 0.05)  # covers the published pseudo-mask threshold 0.20
bool_flag = argparse.BooleanOptionalAction


def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("EPS evaluation (mIoU of PNG masks or of CAMs)")
    g = p.add_argument_group("published evaluate_png.py flags (shown hyphenated; the published "
                             "spellings are aliases)")
    flags.add_dataset(g, DATASETS, help="voc12 (21 classes incl. background), coco (81) or "
                                        "custom (a VOC-layout root with its own labels.txt; "
                                        "needs --data-root or --metadata-dir)")
    g.add_argument("--datalist", type=str, default="train",
                   help="id list: a path (published: metadata/voc12/train.txt) or a split name "
                        "of the dataset's metadata (train, val, ...); pseudo-masks are scored on "
                        "VOC train (1,464 ids)")
    add_flag(g, "--gt-dir", type=Path, default=None,
                   help="folder of ground-truth PNGs <id>.png (published: .../SegmentationClassAug); "
                        "optional when --data-root is given")
    add_flag(g, "--pred-dir", type=Path, default=None,
                   help="folder of predicted label PNGs <id>.png (values 0..C, 0 = background)")
    add_flag(g, "--save-path", type=Path, default=None,
                   help="text table output (published format); default: <pred_dir>_eval.txt, "
                        "or <cam_dir>_sweep.txt for a CAM sweep")
    n = p.add_argument_group("new flags")
    n.add_argument("--json", type=Path, default=None,
                   help="JSON file with every metric; default: save_path with suffix .json")
    flags.add_data_root(n, required=False, help=(
        "dataset root (VOC: the folder holding JPEGImages and SegmentationClassAug); GT masks "
        "are looked up there when --gt-dir is not given"))
    flags.add_metadata_dir(n)
    add_flag(n, "--cam-dir", type=Path, default=None,
                   help="evaluate saved CAMs (<id>.npz from infer.py) instead of PNGs, over a sweep "
                        "of background thresholds (published pseudo-masks use 0.20)")
    add_flag(n, "--thr-range", type=float, nargs=3, default=None,
                   metavar=("START", "STOP", "STEP"),
                   help=f"threshold sweep, STOP included (default {' '.join(map(str, DEFAULT_THR_RANGE))})")
    n.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="explicit list of thresholds for --cam-dir (instead of --thr-range)")
    flags.add_num_workers(n, default_workers(), "decoding worker processes, at most: 0 or 1 = in "
                                                "this process; only as many start as get 250 PNG "
                                                "pairs or 50 CAMs each (default: usable cores, "
                                                "at most 8)")
    flags.add_skip_missing(n, "prediction/CAM or GT")
    add_flag(n, "--published-ignore-invalid", action=bool_flag, default=False,
                   help="drop predicted values >= num_classes (e.g. 255) like evaluate_png.py "
                        "instead of counting them as wrong (default off; identical on valid masks)")
    flags.add_overwrite(n, "replace existing result files (default: refuse)")
    n.add_argument("--progress", action=bool_flag, default=True,
                   help="show a progress bar (on a terminal; default on)")
    return p


def output_paths(save_path, json_path, source: Path, suffix: str):
    """(text path, json path) with the defaults described in --save_path / --json."""
    if save_path is None:
        src = Path(source).resolve()
        save_path = src.parent / f"{src.name}_{suffix}.txt"
    save_path = Path(save_path)
    if json_path is None:
        json_path = save_path.with_suffix(".metrics.json" if save_path.suffix == ".json" else ".json")
    json_path = Path(json_path)
    if save_path.resolve() == json_path.resolve():
        raise EvalError(f"--json and --save_path are the same file ({save_path}); choose two names")
    return save_path, json_path


def refuse_overwrite(paths, overwrite: bool) -> None:
    """A finished result is never silently replaced."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise EvalError(f"{existing[0]} already exists; pass --overwrite to replace it or choose "
                        f"another --save_path / --json")


def dumps_json(obj, indent: int = 0) -> str:
    """Indented JSON where a list or dict of plain values stays on one line (a 21x22 confusion
    matrix is 21 readable lines instead of 483)."""
    pad, inner = " " * indent, " " * (indent + 2)
    nested = (dict, list, tuple)
    if isinstance(obj, dict) and any(isinstance(v, nested) for v in obj.values()):
        items = [f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, nested) for v in obj):
        return "[\n" + ",\n".join(inner + dumps_json(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def thresholds_of(args) -> list:
    """The thresholds of a CAM sweep, checked: each in [0, 1] (CAMs are normalised to [0, 1],
    so a background score outside it gives all-foreground or all-background masks)."""
    if args.thr_range is not None and not all(map(math.isfinite, args.thr_range)):
        raise EvalError(f"--thr-range {' '.join(map(str, args.thr_range))}: START, STOP and STEP "
                        f"must be finite numbers, e.g. --thr-range 0.05 0.95 0.05")
    try:
        thr = (args.thresholds if args.thresholds is not None
               else thresholds_from_range(*(args.thr_range or DEFAULT_THR_RANGE)))
    except ValueError as e:
        raise EvalError(f"--thr-range {' '.join(map(str, args.thr_range))}: {e}; pass START "
                        f"<= STOP and STEP > 0, e.g. --thr-range 0.05 0.95 0.05") from None
    bad = [t for t in thr if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        flag = "--thresholds" if args.thresholds is not None else "--thr-range"
        raise EvalError(f"{flag}: {', '.join(map(str, bad[:5]))} outside [0, 1]; background "
                        f"thresholds must be in [0, 1] (published: 0.20)")
    return thr


def main(args) -> dict:
    """Run the evaluation described by ``args`` and return the JSON record it wrote."""
    if (args.pred_dir is None) == (args.cam_dir is None):
        raise EvalError("pass exactly one of --pred_dir (PNG masks) and --cam-dir (CAM .npz files)")
    if args.cam_dir is None and (args.thr_range is not None or args.thresholds is not None):
        raise EvalError("--thr-range / --thresholds only apply to --cam-dir")
    if args.thr_range is not None and args.thresholds is not None:
        raise EvalError("pass --thr-range or --thresholds, not both")
    if args.num_workers < 0:
        raise EvalError(f"--num-workers {args.num_workers} must be >= 0")
    thr = thresholds_of(args) if args.cam_dir is not None else None
    check_data_root(args.data_root, "--data-root")
    for flag, folder in (("--pred_dir", args.pred_dir), ("--cam-dir", args.cam_dir),
                         ("--gt_dir", args.gt_dir)):
        # a wrong folder is not a missing file: --skip-missing would skip every id
        if folder is not None and not folder.is_dir():
            raise EvalError(f"{flag} {folder}: no such folder; check the path")
    data_root = dataset_root_of(args.data_root) if args.data_root is not None else None
    try:
        info = get_dataset(args.dataset, args.metadata_dir, data_root)
    except UserError:
        raise
    except ValueError as e:
        raise EvalError(str(e)) from None
    num_classes = info.num_classes + 1  # background first, as in the PNGs
    list_path = info.list_path(args.datalist)
    ids = info.read_ids(list_path)
    gt_paths = resolve_gt_paths(ids, args.gt_dir, info, data_root)
    source = args.pred_dir if args.cam_dir is None else args.cam_dir
    save_path, json_path = output_paths(args.save_path, args.json, source,
                                        "eval" if args.cam_dir is None else "sweep")
    refuse_overwrite([save_path, json_path], args.overwrite)
    for out in (save_path, json_path):  # before any compute: the scores must land somewhere
        check_writable(out.parent, "--save_path / --json")
        # temporary files of a killed evaluation (other jobs may be writing here: old ones only)
        remove_stale_temps(out.parent)
    record = {"dataset": info.name, "num_classes": num_classes, "class_names": info.label_names,
              "datalist": str(list_path), "num_ids": len(ids),
              "gt": str(args.gt_dir if args.gt_dir is not None else data_root),
              # what was scored: the predictions' own record, so that this result counts as stale
              # once they are recomputed from other weights (utils/provenance.py)
              "inputs": provenance.inputs_record({"predictions": source})}
    logger.info("%s: %d ids from %s, %d classes, %d workers", info.name, len(ids), list_path,
                num_classes, args.num_workers)
    start = time.time()

    if args.cam_dir is None:
        scores = evaluate_folders(ids, gt_paths, paths_in_dir(args.pred_dir, ids, ".png"),
                                  num_classes, args.num_workers, skip_missing=args.skip_missing,
                                  ignore_invalid=args.published_ignore_invalid,
                                  progress=args.progress)
        seconds = time.time() - start
        record.update(mode="png", pred_dir=str(args.pred_dir), num_images=scores["num_images"],
                      missing=scores["missing"], seconds=round(seconds, 3),
                      invalid_predictions=("dropped (published evaluate_png.py behaviour)"
                                           if args.published_ignore_invalid else "counted as wrong"))
        record.update(scores_to_json(scores, info.label_names))
        record["confusion_layout"] = ("rows: GT class 0..n-1; columns: predicted class 0..n-1, "
                                      "then one column of predictions outside 0..n-1")
        record["confusion"] = scores["confusion"].tolist()
        if scores["invalid_pixels"] > 0:
            # Both conventions from the same matrix, so the published number is one look away.
            record["miou_invalid_counted"] = compute_scores(scores["confusion"])["miou"]
            record["miou_invalid_dropped"] = compute_scores(scores["confusion"], ignore_invalid=True)["miou"]
            logger.warning("%d pixels have a predicted value outside 0..%d (e.g. 255): %s",
                           scores["invalid_pixels"], num_classes - 1, record["invalid_predictions"])
        text = format_table(scores, info.label_names)
        summary = format_summary(scores)
        best = scores
    else:
        result = evaluate_cams(ids, gt_paths, paths_in_dir(args.cam_dir, ids, ".npz"), num_classes,
                               thr, args.num_workers, skip_missing=args.skip_missing,
                               progress=args.progress)
        seconds = time.time() - start
        best = result["scores"][result["best_index"]]
        curve = [{"threshold": t, **{k: v for k, v in scores_to_json(s, info.label_names).items()
                                     if k != "per_class"}}
                 for t, s in zip(result["thresholds"], result["scores"])]
        record.update(mode="cam_sweep", cam_dir=str(args.cam_dir), num_images=result["num_images"],
                      missing=result["missing"], seconds=round(seconds, 3),
                      thresholds=result["thresholds"], miou_curve=[c["miou"] for c in curve],
                      best_threshold=result["best_threshold"], curve=curve,
                      best=scores_to_json(best, info.label_names))
        text = format_sweep(result) + "\n" + format_table(best, info.label_names)
        summary = format_sweep(result)

    n_img = record["num_images"]
    logger.info("evaluated %d images in %.1f s (%.0f images/s)", n_img, seconds,
                n_img / max(seconds, 1e-9))
    atomic_write_text(json_path, dumps_json(record) + "\n")
    atomic_write_text(save_path, text)
    print(summary, end="")
    skipped = f", {len(record['missing'])} missing files skipped" if record["missing"] else ""
    print(f"mIoU {best['miou'] * 100:.2f} | pixel acc {best['pixel_accuracy'] * 100:.2f} | "
          f"mean acc {best['mean_accuracy'] * 100:.2f} | fwIoU {best['fwiou'] * 100:.2f} | "
          f"{n_img} images{skipped}")
    print(f"results: {save_path} and {json_path}")
    return record


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
