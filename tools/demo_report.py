"""Side-by-side report of the demo: CAM baseline vs EPS pseudo-masks on the synthetic dataset.

    python tools/demo_report.py --data-root demo_data --list train \\
        --method "CAM baseline=demo_runs/baseline/result/png" \\
        --method "EPS=demo_runs/eps/result/png" \\
        --seg "EPS=demo_runs/eps/deeplab/val" --seg-list val \\
        --out demo_runs/report.md --figure demo_runs/compare.png

The table holds, per method: the pseudo-mask mIoU, the IoU of every class, and the share of
context pixels (``railroad``, ``water``: background in the ground truth, listed in the dataset's
``context.txt``) that the pseudo-masks label as the class they always come with (``train``,
``boat``). That share is what EPS is about: a classifier trained with image labels alone uses the
railroad as evidence for "train", so its CAM spreads onto it; the saliency loss of EPS pulls the
boundary back to the object. ``--seg`` adds the val mIoU of a segmentation network trained on a
method's pseudo-masks. ``--figure`` writes image | ground truth | one mask per method for a few
images that contain context.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.metadata import atomic_write_text  # noqa: E402
from data.registry import get_dataset  # noqa: E402
from eval import evaluate_folders, read_label_png  # noqa: E402
from utils.io import atomic_path  # noqa: E402
from tools.make_demo_dataset import count_context_errors, read_context_names  # noqa: E402
from utils import vis  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)

CONTEXT_DIR = "ContextMasks"    # <id>.png: 0 = none, else the value of a context.txt line
CONTEXT_FILE = "context.txt"    # "<value> <context name> <class name>" lines, '#' comments


class ReportError(UserError):
    """Bad report input; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------
def parse_named(spec: str) -> Tuple[str, Path]:
    """'NAME=PATH' -> (NAME, PATH)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ReportError(f"expected NAME=FOLDER, got {spec!r}")
    return name.strip(), Path(path.strip())


def fmt(x, pct: bool = False, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    s = f"{x * 100:+.1f}" if signed else f"{x * 100:.1f}"
    return s + ("%" if pct and not signed else "")


def format_report(methods: Sequence[str], rows: Sequence[Tuple[str, Sequence]],
                  pct_rows: Sequence[str] = ()) -> str:
    """Markdown table: one column per method, plus 'last - first' when there are two or more."""
    delta = len(methods) >= 2
    head = ["", *methods] + ([f"{methods[-1]} - {methods[0]}"] if delta else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values in rows:
        pct = label in pct_rows
        cells = [fmt(v, pct=pct) for v in values]
        if delta:
            a, b = values[0], values[-1]
            ok = a is not None and b is not None and np.isfinite(a) and np.isfinite(b)
            cells.append(fmt(b - a, signed=True) if ok else "")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def score_method(info, data_root: Path, ids: Sequence[str], pred_dir: Path,
                 contexts: Dict[int, Tuple[str, str]]) -> Dict:
    """mIoU / per-class IoU (the evaluate.py numbers) and, per context name, (pixels labelled as
    the co-occurring class, context pixels) summed over the images."""
    gt_paths = [info.gt_path(data_root, i) for i in ids]
    preds = [pred_dir / f"{i}.png" for i in ids]
    scores = evaluate_folders(ids, gt_paths, preds, info.num_classes + 1, workers=0,
                              progress=False)
    hits = {ctx: [0, 0] for ctx, _ in contexts.values()}
    for img_id, pred_path in zip(ids, preds):
        ctx_path = data_root / CONTEXT_DIR / f"{img_id}.png"
        if not ctx_path.is_file():
            raise ReportError(f"{ctx_path}: not found; the demo dataset ships one context mask per "
                              f"image (regenerate it with tools/make_demo_dataset.py)")
        counts = count_context_errors(read_label_png(pred_path), read_label_png(ctx_path),
                                      contexts, info.class_names)
        for ctx, (wrong, total) in counts.items():
            hits[ctx][0] += wrong
            hits[ctx][1] += total
    return dict(scores=scores, hits=hits)


def choose_figure_ids(data_root: Path, ids: Sequence[str], num: int,
                      values: Sequence[int]) -> List[Tuple[str, List[int]]]:
    """``num`` ids with context pixels, taking each context value in turn (railroad, water,
    railroad, ...), each with the context values it holds."""
    by_value: Dict[int, List[str]] = {}
    held: Dict[str, List[int]] = {}
    for img_id in ids:
        context = read_label_png(data_root / CONTEXT_DIR / f"{img_id}.png")
        present = [int(v) for v in np.unique(context) if v in values]
        held[img_id] = present
        for v in present:
            if len(by_value.setdefault(v, [])) < num:
                by_value[v].append(img_id)
        if len(by_value) == len(values) and all(len(x) >= num for x in by_value.values()):
            break
    chosen: List[str] = []
    for k in range(num):  # round robin over the context values, without repeats
        for v in sorted(by_value):
            if k < len(by_value[v]) and by_value[v][k] not in chosen and len(chosen) < num:
                chosen.append(by_value[v][k])
    return [(i, held[i]) for i in chosen]


def comparison_figure(data_root: Path, ids: Sequence[str], info, methods: Dict[str, Path],
                      num: int, values: Sequence[int], scale: Optional[int] = None,
                      context_names: Optional[Dict[int, str]] = None) -> Optional[np.ndarray]:
    """Rows: ``num`` ids with context pixels (see choose_figure_ids), each titled with its id and
    context; columns, under a header: image, ground truth, one mask per method; a legend of the
    mask colours at the bottom. ``scale`` enlarges the images by that factor (default: to
    vis.display_size, about 200 px); ``context_names`` maps context values to names for the
    row titles."""
    chosen = choose_figure_ids(data_root, ids, num, values)
    if not chosen:
        return None
    columns = ["image", "ground truth", *methods]
    rows, seen = [], []
    for img_id, ctx in chosen:
        image = np.asarray(Image.open(info.image_path(data_root, img_id)).convert("RGB"))
        gt = read_label_png(info.gt_path(data_root, img_id))
        masks = [read_label_png(folder / f"{img_id}.png") for folder in methods.values()]
        seen += [np.unique(gt)] + [np.unique(m) for m in masks]
        rows.append((img_id, ctx, image, [gt, *masks]))
    # Images of different sizes are centred in equal cells, so the columns line up under their
    # headers (the demo's are all the same size).
    box_hw = (0, 0)
    sizes = []
    for _, _, image, _ in rows:
        h, w = image.shape[:2]
        hw = (h * scale, w * scale) if scale else vis.display_size(h, w)
        sizes.append(hw)
        box_hw = (max(box_hw[0], hw[0]), max(box_hw[1], hw[1]))
    pad = 4
    width = len(columns) * (box_hw[1] + pad) - pad
    parts = [vis.tile([vis.text_strip(c, box_hw[1], bold=True, align="center", bg=vis.WHITE)
                       for c in columns], columns=len(columns), pad=pad)]
    for (img_id, ctx, image, labels), hw in zip(rows, sizes):
        img_s = vis.resize_rgb(image, hw)
        cells = [img_s]
        for m in labels:
            # The ground truth's 255 ring is drawn in its VOC colour: the legend names it, and
            # it shows that those pixels are not scored.
            m_s = vis.resize_labels(m, hw)
            cells.append(vis.blend(img_s, vis.colorize_mask(m_s), 0.6, where=m_s > 0))
        names = [context_names.get(v, str(v)) if context_names else str(v) for v in ctx]
        title = f"{img_id}  (context: {', '.join(names)})" if names else img_id
        row = vis.tile([vis.pad_to(c, box_hw) for c in cells], columns=len(cells), pad=pad)
        parts.append(vis.stack([vis.text_strip(title, width, bg=vis.CAPTION_BG), row],
                               axis=0, pad=2, align="start"))
    entries = vis.legend_entries(np.concatenate(seen), info.class_names)
    parts.append(vis.legend(width, entries, title="mask colours:"))
    return vis.with_margin(vis.stack(parts, axis=0, pad=8, align="start"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("demo report", add_help=False)
    p.add_argument("--data-root", "--data_root", type=Path, required=True,
                   help="the demo dataset (tools/make_demo_dataset.py --out)")
    p.add_argument("--metadata-dir", type=Path, default=None,
                   help="labels.txt and lists (default: the data root)")
    p.add_argument("--list", type=str, default="train",
                   help="ids the pseudo-masks are scored on (published protocol: train)")
    p.add_argument("--method", type=str, action="append", required=True,
                   help="NAME=FOLDER of pseudo-mask PNGs; repeat (first = reference for the delta)")
    p.add_argument("--seg", type=str, action="append", default=[],
                   help="NAME=FOLDER of segmentation PNGs on --seg-list, NAME = the --method whose "
                        "pseudo-masks trained it")
    p.add_argument("--seg-list", type=str, default="val", help="ids of the --seg predictions")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    p.add_argument("--figure", type=Path, default=None,
                   help="write image | GT | masks of a few context images here (PNG)")
    p.add_argument("--figure-num", type=int, default=4, help="rows of the figure")
    return p


def main(args) -> str:
    data_root = args.data_root
    info = get_dataset("custom", args.metadata_dir, data_root)
    ids = info.read_ids(args.list)
    context_file = data_root / CONTEXT_FILE
    if not context_file.is_file():
        raise ReportError(f"{context_file}: not found; it is written by tools/make_demo_dataset.py "
                          f"(regenerate the dataset)")
    # contexts whose class is in this dataset (make_demo_dataset.py --classes may drop some)
    contexts = {v: (ctx, cls) for v, (ctx, cls) in read_context_names(context_file).items()
                if cls in info.class_names}
    methods = dict(parse_named(m) for m in args.method)
    results = {name: score_method(info, data_root, ids, folder, contexts)
               for name, folder in methods.items()}
    names = list(methods)
    rows: List[Tuple[str, list]] = [
        (f"pseudo-mask mIoU ({Path(args.list).stem}, {len(ids)} images)",
         [results[n]["scores"]["miou"] for n in names])]
    for c, label in enumerate(info.label_names):
        rows.append((f"IoU {label}", [results[n]["scores"]["iou"][c] for n in names]))
    pct_rows = []
    for ctx, cls in contexts.values():
        label = f"{ctx} pixels labelled {cls}"
        pct_rows.append(label)
        rows.append((label, [results[n]["hits"][ctx][0] / results[n]["hits"][ctx][1]
                             if results[n]["hits"][ctx][1] else float("nan") for n in names]))
    if args.seg:
        seg = dict(parse_named(s) for s in args.seg)
        unknown = sorted(set(seg) - set(names))
        if unknown:
            raise ReportError(f"--seg names {unknown} are not --method names {names}")
        seg_ids = info.read_ids(args.seg_list)
        seg_miou = {}
        for name, folder in seg.items():
            s = evaluate_folders(seg_ids, [info.gt_path(data_root, i) for i in seg_ids],
                                 [folder / f"{i}.png" for i in seg_ids], info.num_classes + 1,
                                 workers=0, progress=False)
            seg_miou[name] = s["miou"]
        rows.append((f"segmentation net on the pseudo-masks: mIoU ({Path(args.seg_list).stem})",
                     [seg_miou.get(n, float("nan")) for n in names]))
    text = format_report(names, rows, pct_rows)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
    if args.figure is not None:
        grid = comparison_figure(data_root, ids, info, methods, args.figure_num, list(contexts),
                                 context_names={v: ctx for v, (ctx, _) in contexts.items()})
        if grid is None:
            logger.warning("no image of %s has context pixels: no figure", args.list)
        else:
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.figure) as tmp:
                Image.fromarray(grid).save(tmp, format="PNG")
    return text


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
