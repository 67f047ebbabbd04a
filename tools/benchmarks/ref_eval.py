"""The published evaluation process, re-implemented for timing (tools/benchmarks/published.py
runs it as a whole process beside ``evaluate.py``).

It does what EPS ``evaluate_png.py`` does, step for step and with the same libraries (numpy,
PIL, tqdm): read the id list, then per id open the GT PNG, crop the prediction to its box,
and add both to a float64 histogram one image ROW at a time (its ``IOUMetric.add_batch`` zips
over the rows of the two 2-D arrays), each row with a mask of valid pixels and an int64
bincount; then IoU / precision / recall, the text table and the printed summary. The numbers
are the published ones (tests/test_evaluate_cli.py checks evaluate.py against hand values).

    python tools/benchmarks/ref_eval.py --dataset voc12 --datalist list.txt \\
        --gt_dir GT --pred_dir PRED --save_path out.txt
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]


def row_hist(pred_row: np.ndarray, gt_row: np.ndarray, n: int) -> np.ndarray:
    valid = (gt_row >= 0) & (gt_row < n) & (pred_row < n)
    return np.bincount(n * gt_row[valid].astype(int) + pred_row[valid],
                       minlength=n ** 2).reshape(n, n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="voc12 (21 classes) or coco (81)")
    p.add_argument("--datalist", required=True, help="id list file")
    p.add_argument("--gt_dir", required=True, help="folder of GT <id>.png")
    p.add_argument("--pred_dir", required=True, help="folder of predicted <id>.png")
    p.add_argument("--save_path", required=True, help="text table")
    args = p.parse_args()
    n = {"voc12": 21, "coco": 81}[args.dataset]
    names = [line.split()[1] for line in
             (REPO / "metadata" / args.dataset / "labels.txt").read_text().splitlines()]
    hist = np.zeros((n, n))
    ids = open(args.datalist).read().splitlines()
    for img_id in tqdm(ids):
        gt = Image.open(os.path.join(args.gt_dir, img_id + ".png"))
        w, h = gt.size
        gt = np.array(gt, dtype=np.uint8)
        pred = np.array(Image.open(os.path.join(args.pred_dir, img_id + ".png")).crop((0, 0, w, h)),
                        dtype=np.uint8)
        for pred_row, gt_row in zip(pred, gt):
            hist += row_hist(pred_row.flatten(), gt_row.flatten(), n)
    tp = np.diag(hist)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (hist.sum(axis=1) + hist.sum(axis=0) - tp)
        precision, recall = tp / hist.sum(axis=0), tp / hist.sum(axis=1)
    acc = tp.sum() / hist.sum()
    with open(args.save_path, "w") as f:
        f.write("{:>5} {:>20} {:>10} {:>10} {:>10}\n".format("IDX", "Name", "IoU", "Prec", "Recall"))
        f.write("{:>5} {:>20} {:>10.2f} {:>10.2f} {:>10.2f}\n".format(
            "-", "mean", np.nanmean(iou) * 100, np.nanmean(precision) * 100,
            np.nanmean(recall) * 100))
        for i in range(n):
            f.write("{:>5} {:>20} {:>10.2f} {:>10.2f} {:>10.2f}\n".format(
                i, names[i][:10], iou[i] * 100, precision[i] * 100, recall[i] * 100))
    print("{:>8} {:>8.2f} {:>8.2f} {:>8.2f} {:>8.2f}".format(
        "mean", np.nanmean(iou) * 100, np.nanmean(precision) * 100, np.nanmean(recall) * 100,
        acc * 100))


if __name__ == "__main__":
    main()
