"""evaluate.py end to end on files written here: the published command, the text table and JSON,
overwrite refusal, invalid predictions, size mismatch / missing-file errors, the CAM sweep on a
custom dataset, and that every flag has a type and a help text."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
from eval.evaluator import EvalError
from utils.io import save_label_png, save_npz

REPO = Path(__file__).resolve().parent.parent
IDS = ["2007_000032", "2007_000033"]


def make_voc_case(root: Path, pred_a_fix=None):
    """Two 4x6 images. A: background rows 0-1, aeroplane (1) rows 2-3, one aeroplane pixel
    predicted as background. B: person (15) everywhere except one GT 255 pixel, predicted right.
    Hand values: bg IoU 12/13, prec 12/13, recall 1; aeroplane IoU 11/12, prec 1, recall 11/12;
    person 1/1/1; other classes NaN. mIoU 94.66, mean prec 97.44, mean recall 97.22, acc 46/47."""
    gt_a = np.zeros((4, 6), np.uint8)
    gt_a[2:] = 1
    pred_a = gt_a.copy()
    pred_a[3, 5] = 0 if pred_a_fix is None else pred_a_fix
    gt_b = np.full((4, 6), 15, np.uint8)
    gt_b[0, 0] = 255
    pred_b = np.full((4, 6), 15, np.uint8)
    for name, gt, pred in ((IDS[0], gt_a, pred_a), (IDS[1], gt_b, pred_b)):
        save_label_png(root / "gt" / f"{name}.png", gt)
        save_label_png(root / "pred" / f"{name}.png", pred, palette=False)  # published: L-mode
    (root / "list.txt").write_text("\n".join(IDS) + "\n")
    return root / "list.txt", root / "gt", root / "pred"


def run_cli(*argv, cwd=REPO):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, argv)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def parse(*argv):
    return evaluate.get_args_parser().parse_args([str(a) for a in argv] + ["--no-progress"])


def test_published_command_table_json_and_overwrite(tmp_path):
    datalist, gt, pred = make_voc_case(tmp_path)
    out = tmp_path / "res" / "train_miou.txt"
    cmd = ["--dataset", "voc12", "--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
           "--save_path", out]
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2 + 21
    assert lines[:5] == [
        "  IDX                 Name        IoU       Prec     Recall",
        "    -                 mean      94.66      97.44      97.22",
        "    0           background      92.31      92.31     100.00",
        "    1            aeroplane      91.67     100.00      91.67",
        "    2              bicycle        nan        nan        nan",
    ]
    assert lines[2 + 11] == "   11           diningtabl        nan        nan        nan"
    assert lines[2 + 15] == "   15               person     100.00     100.00     100.00"
    assert "    mean    94.66    97.44    97.22    97.87" in r.stdout
    assert "mIoU 94.66" in r.stdout
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["num_images"] == 2 and rec["num_classes"] == 21 and rec["missing"] == []
    assert rec["miou"] == pytest.approx((12 / 13 + 11 / 12 + 1) / 3, rel=1e-12)
    assert rec["pixel_accuracy"] == pytest.approx(46 / 47, rel=1e-12)
    assert rec["per_class"]["aeroplane"]["iou"] == pytest.approx(11 / 12, rel=1e-12)
    assert rec["per_class"]["bicycle"]["iou"] is None  # NaN -> null
    assert rec["confusion"][1][0] == 1 and rec["confusion"][1][1] == 11

    # A finished result is never replaced silently.
    r2 = run_cli(*cmd)
    assert r2.returncode != 0 and "already exists; pass --overwrite" in r2.stderr
    assert "Traceback" not in r2.stderr
    r3 = run_cli(*cmd, "--overwrite", "--num-workers", "0")
    assert r3.returncode == 0, r3.stderr


def test_invalid_prediction_counted_or_dropped(tmp_path):
    datalist, gt, pred = make_voc_case(tmp_path, pred_a_fix=255)
    counted = evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                                  "--save_path", tmp_path / "a.txt", "--num-workers", "0"))
    # The 255 pixel is a miss of aeroplane: bg IoU 1, aeroplane 11/12, person 1.
    assert counted["miou"] == pytest.approx((1 + 11 / 12 + 1) / 3, rel=1e-12)
    assert counted["invalid_pixels"] == 1
    assert counted["miou_invalid_dropped"] == pytest.approx(1.0)
    dropped = evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                                  "--save_path", tmp_path / "b.txt", "--num-workers", "0",
                                  "--published-ignore-invalid"))
    assert dropped["miou"] == pytest.approx(1.0) and dropped["pixel_accuracy"] == pytest.approx(1.0)
    assert dropped["invalid_predictions"].startswith("dropped")


def test_duplicate_id_in_the_list_is_counted_once(tmp_path, caplog):
    datalist, gt, pred = make_voc_case(tmp_path)
    once = evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                               "--save_path", tmp_path / "once.txt", "--num-workers", "0"))
    twice_list = tmp_path / "twice.txt"
    twice_list.write_text(f"{IDS[0]}\n{IDS[1]}\n{IDS[0]}\n")
    with caplog.at_level("WARNING", logger="data.metadata"):
        twice = evaluate.main(parse("--datalist", twice_list, "--gt_dir", gt, "--pred_dir", pred,
                                    "--save_path", tmp_path / "twice.txt.out", "--num-workers", "0"))
    assert any("1 duplicate id line(s) dropped" in r.getMessage() for r in caplog.records)
    assert twice["num_images"] == once["num_images"] == 2 and twice["num_ids"] == 2
    assert twice["miou"] == once["miou"] == pytest.approx((12 / 13 + 11 / 12 + 1) / 3, rel=1e-12)
    assert twice["confusion"] == once["confusion"]


def test_size_mismatch_and_missing_files(tmp_path):
    datalist, gt, pred = make_voc_case(tmp_path)
    save_label_png(pred / f"{IDS[1]}.png", np.zeros((4, 5), np.uint8))
    r = run_cli("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred, "--save_path",
                tmp_path / "x.txt", "--num-workers", "2")
    assert r.returncode != 0
    assert f"{IDS[1]}.png: prediction size 5x4 (WxH) differs" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.txt").exists()

    (pred / f"{IDS[1]}.png").unlink()
    with pytest.raises(EvalError, match=f"{IDS[1]}.png: prediction file of id '{IDS[1]}' not found"):
        evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                            "--save_path", tmp_path / "y.txt", "--num-workers", "0"))
    rec = evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                              "--save_path", tmp_path / "y.txt", "--num-workers", "0",
                              "--skip-missing"))
    assert rec["num_images"] == 1 and len(rec["missing"]) == 1
    # Image A alone: bg IoU 12/13, aeroplane 11/12.
    assert rec["miou"] == pytest.approx((12 / 13 + 11 / 12) / 2, rel=1e-12)


def test_cam_sweep_on_custom_dataset(tmp_path, capsys):
    root = tmp_path / "mydata"
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "labels.txt").write_text("0 background\n1 cat\n2 dog\n")
    (root / "train.txt").write_text("a\n")
    gt = np.zeros((4, 8), np.uint8)
    gt[:, :4] = 2  # dog on the left
    save_label_png(root / "SegmentationClass" / "a.png", gt)
    cam = np.full((1, 4, 8), 0.3, np.float32)
    cam[0, :, :4] = 0.5
    save_npz(tmp_path / "cams" / "a.npz", keys=np.array([1]), cams=cam)  # key 1 = dog
    rec = evaluate.main(parse("--dataset", "custom", "--data-root", root, "--datalist", "train",
                              "--cam-dir", tmp_path / "cams", "--thr-range", "0.2", "0.6", "0.1",
                              "--num-workers", "0"))
    assert rec["thresholds"] == [0.2, 0.3, 0.4, 0.5, 0.6]
    # t = 0.2: all dog -> bg 0, dog 16/32; 0.3 (tie -> bg) and 0.4: perfect; >= 0.5: all bg.
    assert rec["miou_curve"] == pytest.approx([0.25, 1.0, 1.0, 0.25, 0.25])
    assert rec["best_threshold"] == 0.3 and rec["best"]["per_class"]["dog"]["iou"] == 1.0
    out = capsys.readouterr().out
    assert "best threshold 0.300: mIoU 100.00" in out
    txt = (tmp_path / "cams_sweep.txt").read_text()
    assert "<- best" in txt and "  IDX                 Name" in txt
    assert (tmp_path / "cams_sweep.json").exists()


def test_argument_errors(tmp_path):
    datalist, gt, pred = make_voc_case(tmp_path)
    with pytest.raises(EvalError, match="exactly one of --pred_dir"):
        evaluate.main(parse("--datalist", datalist, "--gt_dir", gt))
    with pytest.raises(EvalError, match="--gt_dir .* or --data-root"):
        evaluate.main(parse("--datalist", datalist, "--pred_dir", pred))
    with pytest.raises(EvalError, match="only apply to --cam-dir"):
        evaluate.main(parse("--datalist", datalist, "--gt_dir", gt, "--pred_dir", pred,
                            "--thresholds", "0.2"))


def test_every_flag_has_type_and_help():
    import argparse
    for action in evaluate.get_args_parser()._actions:
        assert action.help, action.dest
        # booleans are --flag / --no-flag switches (the project's one boolean style)
        assert action.type is not None or isinstance(action, argparse.BooleanOptionalAction), \
            action.dest


def test_evaluate_never_imports_torch(tmp_path):
    # torch is ~2 s of import that the evaluator never uses (utils/run.py -> utils/dist.py
    # imports it lazily): a PNG evaluation and a CAM sweep, a user error, and the CLI wrapper
    # leave it unimported.
    datalist, gt, pred = make_voc_case(tmp_path)
    save_npz(tmp_path / "cam" / f"{IDS[0]}.npz", keys=np.array([0]),
             cams=np.linspace(0, 1, 24, dtype=np.float32).reshape(1, 4, 6))
    save_npz(tmp_path / "cam" / f"{IDS[1]}.npz", keys=np.array([14]),
             cams=np.ones((1, 4, 6), np.float32))
    code = f"""
import sys
sys.argv = ["evaluate.py"]
import evaluate
from utils.cli import run_cli
# a fresh torch-free, single-threaded process (no tqdm monitor thread yet) forks its
# evaluator workers (utils/workers.py)
from eval.evaluator import evaluate_folders
from utils.workers import fork_is_safe
ids = {IDS!r}
gts = [{str(gt)!r} + f"/{{i}}.png" for i in ids]
preds = [{str(pred)!r} + f"/{{i}}.png" for i in ids]
forked = fork_is_safe()
pooled = evaluate_folders(ids, gts, preds, 21, workers=2, progress=False, min_per_worker=1)
alone = evaluate_folders(ids, gts, preds, 21, workers=0, progress=False)
print("FORK", forked, (pooled["confusion"] == alone["confusion"]).all())
common = ["--datalist", {str(datalist)!r}, "--gt_dir", {str(gt)!r}, "--no-progress"]
rcs = [run_cli(evaluate.get_args_parser, evaluate.main, argv=common + [
           "--pred_dir", {str(pred)!r}, "--save_path", {str(tmp_path / 'a.txt')!r}]),
       run_cli(evaluate.get_args_parser, evaluate.main, argv=common + [
           "--cam-dir", {str(tmp_path / 'cam')!r}, "--save_path", {str(tmp_path / 's.txt')!r}]),
       run_cli(evaluate.get_args_parser, evaluate.main, argv=common + [
           "--pred_dir", {str(tmp_path / 'nowhere')!r}])]
print("RCS", rcs, "TORCH", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert r.returncode == 0, r.stderr
    assert "RCS [0, 0, 2] TORCH []" in r.stdout, r.stdout + r.stderr
    assert ("FORK True True" if sys.platform.startswith("linux") else "True") in r.stdout
