"""infer.py --labels predicted: pseudo-masks of images without image labels, from the classifier's
own multi-label prediction; the labels it used, written per image and combined, also across
ranks; resume and settings records; the loaders and the pipeline checks need no image labels."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer
from data.metadata import read_image_labels
from network import build_network
from network.heads import EpsHead, Head
from tests.test_infer import IDS, make_checkpoint, make_dataset

C = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A custom root with labels.txt and the list but NO image_labels.txt."""
    tmp = tmp_path_factory.mktemp("predicted")
    root = make_dataset(tmp / "data")
    (root / "image_labels.txt").unlink()
    return dict(root=root, eps=make_checkpoint(tmp / "eps.pth", "small_eps", seed=1),
                cls=make_checkpoint(tmp / "cls.pth", "small_cls"))


def run(root, weights, *extra):
    args = infer.get_args_parser().parse_args(
        [str(a) for a in ("--dataset", "custom", "--img_root", root, "--weights", weights,
                          "--num-workers", 0, "--writer-threads", 1, "--scales", 1.0, 0.5,
                          *extra)])
    infer.main(args)
    return args


def pngs(folder: Path) -> dict:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


# ------------------------------------------------------------------------------------------------
def test_labels_from_scores():
    probs = torch.tensor([0.2, 0.7, 0.5])
    assert infer.labels_from_scores(probs, 0.5).tolist() == [0, 1, 1]
    assert infer.labels_from_scores(probs, 0.8).tolist() == [0, 1, 0]  # none passes: top class
    assert infer.labels_from_scores(torch.tensor([0.3, 0.3, 0.1]), 0.5).tolist() == [1, 0, 0]


@pytest.mark.parametrize("name", ["small_cls", "small_eps"])
def test_class_scores_are_the_logits_the_loss_trains(name):
    """cls: fc8 after global average pooling (= the mean of the pre-ReLU map, fc8 being linear
    without bias); eps: the mean of the raw maps, background channel dropped."""
    torch.manual_seed(0)
    model = build_network(name, C).eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        scores = model.class_scores(x)
        feats = model.forward_features(x)
        expect = F.conv2d(feats, model.fc8.weight).mean(dim=(2, 3))[:, :C]
    assert scores.shape == (2, C)
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-5)


def test_pseudo_masks_without_image_labels(env, tmp_path):
    out = tmp_path / "png"
    run(env["root"], env["eps"], "--png-dir", out, "--labels", "predicted", "--label-thr", 0.5)
    assert sorted(pngs(out)) == sorted(IDS)
    # the combined file is an image_labels.txt; each record holds the line and the C scores
    labels = read_image_labels(out.parent / infer.PREDICTED_FILE, C)
    assert list(labels) == IDS and all(v.any() for v in labels.values())
    scores = np.loadtxt(out.parent / infer.SCORES_FILE, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    header = (out.parent / infer.SCORES_FILE).read_text().splitlines()[0]
    assert header == "id,cat,dog,train"
    for i, row in zip(IDS, scores):
        expect = infer.labels_from_scores(torch.tensor(row), 0.5).numpy()
        np.testing.assert_array_equal(labels[i], expect)
        assert (out.parent / infer.PREDICTED_DIR / f"{i}.txt").read_text().startswith(f"{i} ")
    # the same masks as a ground-truth-label run whose image_labels.txt holds those labels
    root2 = tmp_path / "with_labels"
    shutil.copytree(env["root"], root2)
    shutil.copy(out.parent / infer.PREDICTED_FILE, root2 / "image_labels.txt")
    run(root2, env["eps"], "--png-dir", tmp_path / "gt_png")
    a, b = pngs(out), pngs(tmp_path / "gt_png")
    assert all(np.array_equal(a[i], b[i]) for i in IDS)
    # the settings record names the label source and its threshold
    rec = json.loads((out / infer.SETTINGS_FILE).read_text())
    assert rec["labels"] == "predicted" and rec["label_thr"] == 0.5
    # the labels are beside the output folder, which holds the masks and the run's records only
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        infer.SETTINGS_FILE, "args.json", "env.json", "log.txt"]


def test_resume_settings_and_the_combined_file(env, tmp_path):
    out = tmp_path / "png"
    run(env["root"], env["cls"], "--png-dir", out, "--labels", "predicted")
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # a lost label record is a missing output: that image alone is made again
    (out.parent / infer.PREDICTED_DIR / "img_c.txt").unlink()
    (out.parent / infer.PREDICTED_FILE).unlink()
    run(env["root"], env["cls"], "--png-dir", out, "--labels", "predicted")
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert [k for k in stamp if now[k] != stamp[k]] == ["img_c.png"]
    assert list(read_image_labels(out.parent / infer.PREDICTED_FILE, C)) == IDS
    # other label settings on the same folder are refused
    with pytest.raises(infer.InferError, match=r"label_thr: 0.4 -> 0.3"):
        run(env["root"], env["cls"], "--png-dir", out, "--labels", "predicted", "--label-thr", 0.3)
    root2 = tmp_path / "with_labels"
    shutil.copytree(env["root"], root2)
    shutil.copy(out.parent / infer.PREDICTED_FILE, root2 / "image_labels.txt")
    with pytest.raises(infer.InferError, match=r"labels: 'predicted' -> 'gt'"):
        run(root2, env["cls"], "--png-dir", out)


def test_where_the_labels_go_and_who_shares_them(env, tmp_path):
    """Beside the output folders (their parent) by default, in --run-dir when given; runs side by
    side that predict the same labels share them (a --thr sweep), another checkpoint is refused
    with the way out; evaluate.py scores the masks of such a folder as any other."""
    run(env["root"], env["eps"], "--png-dir", tmp_path / "thr20", "--labels", "predicted")
    run(env["root"], env["eps"], "--png-dir", tmp_path / "thr30", "--labels", "predicted",
        "--thr", 0.3)
    assert list(read_image_labels(tmp_path / infer.PREDICTED_FILE, C)) == IDS
    with pytest.raises(infer.InferError, match=r"predicted_labels holds results made with other "
                                               r"settings \(weights: .*give this run its own --run-dir"):
        run(env["root"], env["cls"], "--png-dir", tmp_path / "cls", "--labels", "predicted")
    assert not (tmp_path / "cls").exists()
    run(env["root"], env["cls"], "--png-dir", tmp_path / "cls", "--labels", "predicted",
        "--run-dir", tmp_path / "cls_run")
    assert list(read_image_labels(tmp_path / "cls_run" / infer.PREDICTED_FILE, C)) == IDS
    assert [p.name for p in (tmp_path / "cls").iterdir() if p.suffix != ".png"] == [infer.SETTINGS_FILE]


def test_records_written_before_the_flag_existed_still_resume(env, tmp_path):
    """A folder whose settings record predates --labels (no key) was made with image labels."""
    root = tmp_path / "data"
    shutil.copytree(env["root"], root)
    (root / "image_labels.txt").write_text("img_a 0\nimg_b 1 2\nimg_c 0 2\nimg_d 2\n")
    out = tmp_path / "png"
    run(root, env["cls"], "--png-dir", out)
    rec = json.loads((out / infer.SETTINGS_FILE).read_text())
    assert rec["labels"] == "gt" and rec["label_thr"] is None
    for key in ("labels", "label_thr"):
        rec.pop(key)
    (out / infer.SETTINGS_FILE).write_text(json.dumps(rec))
    run(root, env["cls"], "--png-dir", out, "--label-thr", 0.9)  # label-thr means nothing with gt


def test_ranks_write_their_own_records_and_the_last_one_combines(env, tmp_path, monkeypatch):
    out = tmp_path / "png"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    # (--device auto under a launcher of 2 processes needs CUDA: utils/device.py)
    run(env["root"], env["eps"], "--png-dir", out, "--labels", "predicted", "--device", "cpu")
    assert sorted(p.stem for p in (out.parent / infer.PREDICTED_DIR).glob("*.txt")) == ["img_a", "img_c"]
    assert not (out.parent / infer.PREDICTED_FILE).exists()   # rank 1 has not written its part yet
    monkeypatch.setenv("RANK", "1")
    run(env["root"], env["eps"], "--png-dir", out, "--labels", "predicted", "--device", "cpu")
    assert list(read_image_labels(out.parent / infer.PREDICTED_FILE, C)) == IDS   # list order


def test_heads_without_class_scores_and_bad_threshold_are_refused(env, tmp_path, monkeypatch):
    with pytest.raises(infer.InferError, match=r"--label-thr 1.0 must be in \(0, 1\)"):
        run(env["root"], env["eps"], "--png-dir", tmp_path / "a", "--labels", "predicted",
            "--label-thr", 1.0)
    monkeypatch.setattr(EpsHead, "class_scores", Head.class_scores)
    with pytest.raises(infer.InferError, match="'eps' head .* declares no class_scores"):
        run(env["root"], env["eps"], "--png-dir", tmp_path / "b", "--labels", "predicted")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # without image_labels.txt the published mode says how to go on
    monkeypatch.undo()
    with pytest.raises(infer.InferError, match=r"image_labels.txt: file not found.*--labels predicted"):
        run(env["root"], env["eps"], "--png-dir", tmp_path / "c")


def test_evaluation_and_preflight_need_no_image_labels(env, tmp_path):
    import evaluate
    from tools import preflight
    out = tmp_path / "png"
    gt = env["root"] / "SegmentationClassAug"
    gt.mkdir(exist_ok=True)
    for i in IDS:
        w, h = Image.open(env["root"] / "JPEGImages" / f"{i}.jpg").size
        Image.fromarray(np.zeros((h, w), np.uint8)).save(gt / f"{i}.png")
    infer_argv = ["--dataset", "custom", "--img_root", str(env["root"]), "--weights",
                  str(env["cls"]), "--png-dir", str(out), "--labels", "predicted"]
    eval_argv = ["--dataset", "custom", "--data-root", str(env["root"]), "--datalist", "train",
                 "--pred_dir", str(out), "--save_path", str(tmp_path / "miou.txt"),
                 "--num-workers", "0", "--no-progress"]
    stages = preflight.preflight([("infer", "infer.py", infer_argv),
                                  ("eval", "evaluate.py", eval_argv)], 1, {"*": 1}, "cpu")
    assert [p for s in stages for p in s.problems] == []
    infer.main(infer.get_args_parser().parse_args(infer_argv + ["--num-workers", "0"]))
    evaluate.main(evaluate.get_args_parser().parse_args(eval_argv))
    assert (tmp_path / "miou.txt").is_file()
    shutil.rmtree(gt)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_predicted_labels(env, tmp_path):
    out = tmp_path / "png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "infer.py"), "--dataset", "custom", "--img_root", str(env["root"]),
           "--weights", str(env["eps"]), "--png-dir", str(out), "--num-workers", "0",
           "--labels", "predicted", "--scales", "1.0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(IDS)
    assert list(read_image_labels(out.parent / infer.PREDICTED_FILE, C)) == IDS
    lines = (out.parent / infer.SCORES_FILE).read_text().splitlines()
    assert len(lines) == 1 + len(IDS) and all(len(x.split(",")) == 1 + C for x in lines)
