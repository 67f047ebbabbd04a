"""eval/: confusion matrices and scores against hand-computed values and a per-pixel loop,
the invalid-prediction conventions, the CAM threshold sweep, and folder evaluation errors."""
import math

import numpy as np
import pytest
from PIL import Image

from eval.cam_sweep import (cam_best, evaluate_cams, format_sweep, load_cam_file,
                            thresholds_from_range)
from eval.evaluator import EvalError, evaluate_folders, read_label_png
from eval.metrics import (compute_scores, confusion_matrix, format_summary, format_table,
                          scores_to_json, sweep_confusion_matrices)
from network.cam import pseudo_mask
from utils.io import save_label_png, save_npz


def cams_to_mask(keys, cams, thr):
    # The published pseudo-mask rule as infer.py applies it; the sweep must agree with it.
    return pseudo_mask(keys, cams, thr).numpy()

# ---------------------------------------------------------------- a hand-computed 4-class case
# Pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) / (2,0) (1,255) (255,3) (255,0)
GT = np.array([[0, 0, 1, 1], [2, 1, 255, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 255, 3, 0]], dtype=np.uint8)
# Class 3 is predicted only where GT is 255 (ignored), so it is absent from both -> NaN.
CONF = np.array([[1, 1, 0, 0, 0],
                 [0, 2, 0, 0, 1],   # last column: GT 1 predicted 255 (invalid)
                 [1, 0, 0, 0, 0],
                 [0, 0, 0, 0, 0]])


def assert_nan_equal(a, b):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-12, atol=0,
                               equal_nan=True)


def test_confusion_hand_values():
    conf = confusion_matrix(GT, PRED, 4)
    assert conf.dtype == np.int64 and conf.shape == (4, 5)
    np.testing.assert_array_equal(conf, CONF)


def test_scores_invalid_counted_as_wrong_hand_values():
    s = compute_scores(CONF)
    # gt_pixels [2,3,1,0] (the invalid pixel is a miss of class 1); pred_pixels [2,3,0,0]; tp [1,2,0,0]
    assert_nan_equal(s["iou"], [1 / 3, 2 / 4, 0.0, np.nan])
    assert_nan_equal(s["precision"], [1 / 2, 2 / 3, np.nan, np.nan])
    assert_nan_equal(s["recall"], [1 / 2, 2 / 3, 0.0, np.nan])
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3, abs=1e-15)   # NaN class skipped,
    assert s["mean_precision"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-15)  # GT-only class = 0
    assert s["mean_recall"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3, abs=1e-15)
    assert s["mean_accuracy"] == s["mean_recall"]
    assert s["pixel_accuracy"] == pytest.approx(3 / 6, abs=1e-15)
    assert s["fwiou"] == pytest.approx(2 / 6 * 1 / 3 + 3 / 6 * 1 / 2, abs=1e-15)
    assert s["num_pixels"] == 6 and s["invalid_pixels"] == 1


def test_scores_published_drop_invalid_hand_values():
    s = compute_scores(CONF, ignore_invalid=True)
    # The (1, 255) pixel disappears: gt_pixels [2,2,1,0].
    assert_nan_equal(s["iou"], [1 / 3, 2 / 3, 0.0, np.nan])
    assert_nan_equal(s["recall"], [1 / 2, 1.0, 0.0, np.nan])
    assert s["miou"] == pytest.approx(1 / 3, abs=1e-15)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5, abs=1e-15)
    assert s["fwiou"] == pytest.approx(2 / 5 * 1 / 3 + 2 / 5 * 2 / 3, abs=1e-15)


def test_prediction_only_class_counts_zero_but_not_in_gt_class_mean():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted, absent from GT: IoU 0, counted in mIoU
    s = compute_scores(confusion_matrix(gt, pred, 3))
    assert_nan_equal(s["iou"], [1 / 2, 1.0, 0.0])
    assert s["miou"] == pytest.approx(1 / 2)
    assert s["miou_gt_classes"] == pytest.approx(3 / 4)  # deeplab-pytorch convention, for reference


def test_square_matrix_input_and_empty():
    s = compute_scores(CONF[:, :4])
    assert s["miou"] == pytest.approx(1 / 3)
    e = compute_scores(np.zeros((3, 4)))
    assert math.isnan(e["miou"]) and math.isnan(e["pixel_accuracy"])
    with pytest.raises(ValueError):
        compute_scores(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 3)


# ------------------------------------------------------- independent straightforward versions
def loop_confusion(gt, pred, n, drop_invalid):
    """Per-pixel Python loop: returns {(g, p): count} with p = 'x' for invalid predictions."""
    counts = {}
    for g, p in zip(np.asarray(gt).ravel().tolist(), np.asarray(pred).ravel().tolist()):
        if not 0 <= g < n:
            continue
        if not 0 <= p < n:
            if drop_invalid:
                continue
            p = "x"
        counts[(g, p)] = counts.get((g, p), 0) + 1
    return counts


def loop_scores(counts, n):
    out = {"iou": [], "precision": [], "recall": []}
    total = sum(counts.values())
    correct = sum(v for (g, p), v in counts.items() if g == p)
    for c in range(n):
        tp = counts.get((c, c), 0)
        gt_c = sum(v for (g, _), v in counts.items() if g == c)
        pr_c = sum(v for (_, p), v in counts.items() if p == c)
        out["iou"].append(tp / (gt_c + pr_c - tp) if gt_c + pr_c - tp else float("nan"))
        out["precision"].append(tp / pr_c if pr_c else float("nan"))
        out["recall"].append(tp / gt_c if gt_c else float("nan"))
    vals = [x for x in out["iou"] if not math.isnan(x)]
    out["miou"] = sum(vals) / len(vals)
    out["pixel_accuracy"] = correct / total
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])  # 8-bit fast path and general path
@pytest.mark.parametrize("drop", [False, True])
def test_agrees_with_per_pixel_loop_on_random_images(drop, dtype):
    rng = np.random.default_rng(0)
    n = 6
    total = np.zeros((n, n + 1), dtype=np.int64)
    counts = {}
    for _ in range(4):
        shape = tuple(rng.integers(5, 17, size=2))
        # class 5 never in GT; 6 and 7 are out of range, ignored like 255
        gt = rng.choice([0, 1, 2, 3, 4, 6, 7, 255], size=shape).astype(dtype)
        pred = rng.choice([0, 1, 2, 3, 5, 6, 255], size=shape).astype(dtype)  # 6, 255 invalid
        total += confusion_matrix(gt, pred, n)
        for k, v in loop_confusion(gt, pred, n, drop).items():
            counts[k] = counts.get(k, 0) + v
    s = compute_scores(total, ignore_invalid=drop)
    ref = loop_scores(counts, n)
    for k in ("iou", "precision", "recall"):
        assert_nan_equal(s[k], ref[k])
    assert s["miou"] == pytest.approx(ref["miou"], rel=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], rel=1e-12)
    if not drop:
        assert s["invalid_pixels"] == sum(v for (_, p), v in counts.items() if p == "x") > 0


def test_both_conventions_identical_on_valid_predictions():
    rng = np.random.default_rng(1)
    gt = rng.choice([0, 1, 2, 3, 255], size=(30, 40))
    pred = rng.integers(0, 4, size=(30, 40))
    conf = confusion_matrix(gt, pred, 4)
    a, b = compute_scores(conf), compute_scores(conf, ignore_invalid=True)
    for k in ("iou", "precision", "recall", "miou", "pixel_accuracy", "fwiou", "mean_recall"):
        assert_nan_equal(a[k], b[k])


# --------------------------------------------------------------------------- text and JSON
def test_format_table_published_layout():
    s = compute_scores(CONF[:3, :3])  # 3 classes: bg, aeroplane, diningtable
    text = format_table(s, ["background", "aeroplane", "diningtable"])
    assert text.splitlines() == [
        "  IDX                 Name        IoU       Prec     Recall",
        "    -                 mean      33.33      58.33      50.00",
        "    0           background      33.33      50.00      50.00",
        "    1            aeroplane      66.67      66.67     100.00",
        "    2           diningtabl       0.00        nan       0.00",
    ]
    assert format_summary(s).splitlines() == ["     IDX      IoU     Prec   Recall      ACC",
                                              "    mean    33.33    58.33    50.00    60.00"]
    j = scores_to_json(s, ["background", "aeroplane", "diningtable"])
    assert j["per_class"]["diningtable"] == {"index": 2, "iou": 0.0, "precision": None,
                                             "recall": 0.0, "gt_pixels": 1, "pred_pixels": 0}


# ------------------------------------------------------------------------------- CAM sweep
def test_thresholds_from_range():
    t = thresholds_from_range(0.05, 0.95, 0.05)
    assert len(t) == 19 and t[0] == 0.05 and t[-1] == 0.95 and 0.2 in t and 0.3 in t
    assert thresholds_from_range(0.2, 0.2, 0.1) == [0.2]
    with pytest.raises(ValueError):
        thresholds_from_range(0.5, 0.1, 0.1)


def test_cams_to_mask_rule_and_ties():
    keys = np.array([2, 4])
    cams = np.array([[[0.5, 0.2, 0.7, 0.3]],
                     [[0.5, 0.1, 0.9, 0.1]]], dtype=np.float32)
    # pixel 0: two classes tie -> first key (2 -> 3); pixel 1: CAM 0.2 == thr -> background
    np.testing.assert_array_equal(cams_to_mask(keys, cams, 0.2), [[3, 0, 5, 3]])
    np.testing.assert_array_equal(cams_to_mask(keys, cams, 0.6), [[0, 0, 5, 0]])


def test_cam_best_ties_go_to_the_first_key():
    rng = np.random.default_rng(5)
    keys = np.array([1, 4, 7])
    cams = (rng.integers(0, 4, size=(3, 9, 11)) * 0.25).astype(np.float32)  # many exact ties
    score, label = cam_best(keys, cams, (9, 11))
    np.testing.assert_array_equal(score, cams.max(0))
    np.testing.assert_array_equal(label, (keys + 1)[cams.argmax(0)])
    empty_score, empty_label = cam_best(np.zeros(0, np.int64), np.zeros((0, 9, 11), np.float32), (9, 11))
    assert np.isneginf(empty_score).all() and not empty_label.any()


def test_sweep_matches_per_threshold_masks():
    rng = np.random.default_rng(2)
    n = 5
    gt = rng.choice([0, 1, 2, 3, 4, 255], size=(23, 31))
    # CAM values on a 0.05 grid so many pixels tie exactly with a threshold.
    keys = np.array([0, 2, 3])
    cams = (rng.integers(0, 21, size=(3, 23, 31)) * 0.05).astype(np.float32)
    thr = [0.5, 0.1, 0.25, 0.3, 0.0, 1.0]  # unsorted on purpose
    score = cams.max(0)
    label = (keys + 1)[cams.argmax(0)]
    sweep = sweep_confusion_matrices(gt, score, label, thr, n)
    assert sweep.shape == (6, n, n + 1)
    for i, t in enumerate(thr):
        np.testing.assert_array_equal(sweep[i], confusion_matrix(gt, cams_to_mask(keys, cams, t), n))


def _write_case(tmp_path, n_extra_ids=0):
    """One 4x8 image: GT class 1 (aeroplane) on the left half, background on the right.
    CAM of key 0: 0.5 on the left, 0.3 on the right. Expected mIoU by threshold:
    t < 0.3: all foreground (0.25); 0.3 <= t < 0.5: perfect (1.0; 0.3 is a tie -> bg); t >= 0.5: 0.25."""
    gt_dir, cam_dir = tmp_path / "gt", tmp_path / "cam"
    gt = np.zeros((4, 8), np.uint8)
    gt[:, :4] = 1
    gt[0, 0] = 255
    save_label_png(gt_dir / "a.png", gt)
    cam = np.full((1, 4, 8), 0.3, np.float32)
    cam[0, :, :4] = 0.5
    save_npz(cam_dir / "a.npz", keys=np.array([0]), cams=cam, bg=np.zeros((4, 8), np.float32))
    return gt_dir, cam_dir


def test_evaluate_cams_known_best_threshold(tmp_path):
    gt_dir, cam_dir = _write_case(tmp_path)
    r = evaluate_cams(["a"], [gt_dir / "a.png"], [cam_dir / "a.npz"], num_classes=3,
                      thresholds=[0.6, 0.2, 0.3, 0.4, 0.5], workers=0, progress=False)
    assert r["thresholds"] == [0.2, 0.3, 0.4, 0.5, 0.6]
    # t=0.2: IoU bg 0/16, fg 15/31 (one fg pixel ignored); t=0.5/0.6: bg 16/31, fg 0/15; class 2 NaN.
    assert_nan_equal(r["miou"], [15 / 31 / 2, 1.0, 1.0, 16 / 31 / 2, 16 / 31 / 2])
    assert r["best_threshold"] == 0.3 and r["best_index"] == 1
    assert r["num_images"] == 1
    assert "<- best" in format_sweep(r).splitlines()[2]


def test_evaluate_cams_equals_png_evaluation_of_its_masks(tmp_path):
    rng = np.random.default_rng(3)
    n = 21
    ids = [f"im{i}" for i in range(3)]
    thr = [0.1, 0.2, 0.35]
    for i in ids:
        h, w = rng.integers(6, 14, size=2)
        save_label_png(tmp_path / "gt" / f"{i}.png", rng.choice([0, 3, 5, 255], size=(h, w)))
        keys = np.sort(rng.choice(20, size=int(rng.integers(0, 3)), replace=False))
        cams = rng.random((len(keys), h, w)).astype(np.float32)
        save_npz(tmp_path / "cam" / f"{i}.npz", keys=keys, cams=cams)
        for t in thr:
            save_label_png(tmp_path / f"png{t}" / f"{i}.png", cams_to_mask(keys, cams, t))
    gts = [tmp_path / "gt" / f"{i}.png" for i in ids]
    r = evaluate_cams(ids, gts, [tmp_path / "cam" / f"{i}.npz" for i in ids], n, thr, workers=0,
                      progress=False)
    for j, t in enumerate(thr):
        s = evaluate_folders(ids, gts, [tmp_path / f"png{t}" / f"{i}.png" for i in ids], n,
                             workers=0, progress=False)
        np.testing.assert_array_equal(r["confusions"][j], s["confusion"])


def test_cam_file_errors(tmp_path):
    save_npz(tmp_path / "bad_keys.npz", keys=np.array([20]), cams=np.zeros((1, 2, 2), np.float32))
    with pytest.raises(EvalError, match="bad_keys.npz.*0..19"):
        load_cam_file(tmp_path / "bad_keys.npz", 21)
    save_npz(tmp_path / "no_cams.npz", keys=np.array([1]))
    with pytest.raises(EvalError, match="no_cams.npz"):
        load_cam_file(tmp_path / "no_cams.npz", 21)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalError, match="junk.npz"):
        load_cam_file(tmp_path / "junk.npz", 21)
    # A CAM whose size differs from the GT names the CAM file.
    gt_dir, cam_dir = _write_case(tmp_path)
    save_npz(cam_dir / "a.npz", keys=np.array([0]), cams=np.zeros((1, 4, 9), np.float32))
    with pytest.raises(EvalError, match=r"a\.npz: CAM size 9x4"):
        evaluate_cams(["a"], [gt_dir / "a.png"], [cam_dir / "a.npz"], 3, [0.2], progress=False)


# ---------------------------------------------------------------------- folders and errors
def _pair(tmp_path, name, gt, pred):
    save_label_png(tmp_path / "gt" / f"{name}.png", gt)
    save_label_png(tmp_path / "pred" / f"{name}.png", pred, palette=False)
    return tmp_path / "gt" / f"{name}.png", tmp_path / "pred" / f"{name}.png"


def test_evaluate_folders_parallel_equals_serial_and_hand_values(tmp_path):
    rng = np.random.default_rng(4)
    ids, gts, preds = ["hand"], [], []
    g, p = _pair(tmp_path, "hand", GT, PRED)
    gts.append(g)
    preds.append(p)
    for i in range(5):
        gt = rng.choice([0, 1, 2, 255], size=(9, 7))
        g, p = _pair(tmp_path, f"r{i}", gt, rng.integers(0, 4, size=(9, 7)))
        ids.append(f"r{i}")
        gts.append(g)
        preds.append(p)
    one = evaluate_folders(ids[:1], gts[:1], preds[:1], 4, workers=0, progress=False)
    np.testing.assert_array_equal(one["confusion"], CONF)
    serial = evaluate_folders(ids, gts, preds, 4, workers=0, progress=False)
    parallel = evaluate_folders(ids, gts, preds, 4, workers=2, progress=False, min_per_worker=1)
    np.testing.assert_array_equal(serial["confusion"], parallel["confusion"])
    assert serial["num_images"] == 6


def test_pool_size_starts_workers_only_for_long_lists():
    from eval.evaluator import PNG_ITEMS_PER_WORKER, pool_size
    assert pool_size(2, 400, 250) == 1        # in this process
    assert pool_size(2, 500, 250) == 2
    assert pool_size(8, 1449, 250) == 5       # each worker gets at least 250
    assert pool_size(0, 10_000, 250) == 0     # --num-workers 0 stays in this process
    assert pool_size(2, 3, 1) == 2
    # the default for PNG pairs: the 1,464 VOC train masks use 2 workers, a 100-mask demo none
    assert pool_size(2, 1464, PNG_ITEMS_PER_WORKER) == 2
    assert pool_size(2, 100, PNG_ITEMS_PER_WORKER) <= 1


def test_size_mismatch_is_an_error_naming_the_file(tmp_path):
    g, p = _pair(tmp_path, "x", np.zeros((4, 6)), np.zeros((4, 5)))
    with pytest.raises(EvalError, match=r"pred/x\.png: prediction size 5x4 .*differs"):
        evaluate_folders(["x"], [g], [p], 21, progress=False)


def test_missing_files_error_or_skipped_with_count(tmp_path):
    g, p = _pair(tmp_path, "x", np.zeros((4, 6)), np.zeros((4, 6)))
    missing = tmp_path / "pred" / "y.png"
    with pytest.raises(EvalError, match=r"y\.png: prediction file of id 'y' not found.*--skip-missing"):
        evaluate_folders(["x", "y"], [g, g], [p, missing], 21, progress=False)
    s = evaluate_folders(["x", "y"], [g, g], [p, missing], 21, skip_missing=True, progress=False)
    assert s["num_images"] == 1 and s["missing"] == [{"id": "y", "path": str(missing),
                                                     "kind": "prediction"}]


def test_read_label_png_modes(tmp_path):
    Image.new("RGB", (3, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(EvalError, match="rgb.png.*mode 'RGB'"):
        read_label_png(tmp_path / "rgb.png")
    save_label_png(tmp_path / "p.png", np.array([[0, 15, 255]]))
    np.testing.assert_array_equal(read_label_png(tmp_path / "p.png"), [[0, 15, 255]])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(EvalError, match="broken.png"):
        read_label_png(tmp_path / "broken.png")


def test_worker_errors_reach_the_caller(tmp_path):
    # a size mismatch found inside a worker process is the same one-line EvalError
    pairs = [_pair(tmp_path, f"i{k}", np.zeros((4, 6)), np.zeros((4, 6 if k else 5)))
             for k in range(4)]
    gts, preds = [g for g, _ in pairs], [p for _, p in pairs]
    with pytest.raises(EvalError, match=r"pred/i0\.png: prediction size 5x4 .*differs"):
        evaluate_folders([f"i{k}" for k in range(4)], gts, preds, 21, workers=2, progress=False,
                         min_per_worker=1)


def test_fork_only_where_it_is_safe():
    # torch imported (this test process): evaluator pools are spawned. In a fresh torch-free
    # process: forked while it runs one thread, spawned once a second thread runs (a lock held by
    # that thread at fork time would stay locked in the child), spawned after torch is imported
    import subprocess
    import sys
    from pathlib import Path
    from utils.workers import fork_is_safe
    assert "torch" in sys.modules and not fork_is_safe()
    code = """
import threading
from utils.workers import fork_is_safe, mp_pool
def method():
    with mp_pool(1, fork_if_safe=True) as pool:
        return pool._ctx.get_start_method()
seen = [method()]
stop = threading.Event()
t = threading.Thread(target=stop.wait); t.start()
seen.append(method()); stop.set(); t.join()
seen.append(method())
import torch
seen.append(method())
print(*seen)
"""
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["fork", "spawn", "fork", "spawn"] if sys.platform.startswith("linux")
                                else ["spawn"] * 4)
