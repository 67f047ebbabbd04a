"""Segmentation stage end to end on generated data: training steps, train_seg.py (with resume),
infer_seg.py (+ CRF) and evaluation, all with the tiny deeplabv2_small network on CPU."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.run import RunDirError
import infer_seg
import train_seg
from data.datasets import DataError
from data.metadata import write_class_names, write_id_list, write_image_labels
from network.deeplab import build_deeplab
from train_seg import seg_loss
from utils.io import save_label_png
from utils.optim import build_optimizer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
CLASSES = ["background", "square", "disc"]


def make_dataset(root: Path, n_train=6, n_val=3, size=(40, 56), seed=0):
    """A VOC-layout 'custom' dataset: a red square (class 1) and/or a green disc (class 2)."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    ids, labels = {"train": [], "val": []}, {}
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            img_id = f"{split}_{k:03d}"
            img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            present = []
            if k % 3 != 2:
                y, x = rng.integers(2, h - 16), rng.integers(2, w - 16)
                mask[y:y + 14, x:x + 14] = 1
                present.append(0)
            if k % 3 != 0:
                cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 2
                present.append(1)
            img[mask == 1] = (220, 30, 30)
            img[mask == 2] = (30, 200, 40)
            Image.fromarray(img).save(root / "JPEGImages" / f"{img_id}.jpg", quality=95)
            save_label_png(root / "SegmentationClass" / f"{img_id}.png", mask)
            ids[split].append(img_id)
            labels[img_id] = np.isin(np.arange(2), present).astype(np.float32)
    write_class_names(root / "labels.txt", CLASSES)
    write_image_labels(root / "image_labels.txt", labels)
    write_id_list(root / "train.txt", ids["train"])
    write_id_list(root / "train_aug.txt", ids["train"])
    write_id_list(root / "val.txt", ids["val"])
    # pseudo-masks: the GT with a 255 (ignore) band, as a stand-in for EPS's result/png
    pseudo = root / "pseudo"
    for img_id in ids["train"]:
        m = np.array(Image.open(root / "SegmentationClass" / f"{img_id}.png"))
        m[:, :3] = 255
        save_label_png(pseudo / f"{img_id}.png", m)
    return ids


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segdata")
    make_dataset(root)
    return root


def parse(parser_fn, argv):
    return argparse.ArgumentParser(parents=[parser_fn()]).parse_args([str(a) for a in argv])


def train_argv(root, run_dir, max_iters=4, extra=()):
    return ["--dataset", "custom", "--data_root", root, "--mask-dir", root / "pseudo",
            "--arch", "deeplabv2_small", "--max-iters", max_iters, "--batch-size", 2,
            "--iter-size", 2, "--crop-size", 40, "--lr", 2e-3, "--num-workers", 0,
            "--log-every", 1, "--ckpt-every", 2, "--save-every", 0, "--run-dir", run_dir, *extra]


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = build_deeplab("deeplabv2_small", 3).train()
    x = torch.randn(4, 3, 48, 48) * 40
    lab = torch.zeros(4, 48, 48, dtype=torch.long)
    lab[:, 10:30, 5:25], lab[:, 30:, 30:] = 1, 2
    x[:, 2][lab == 1] += 100  # BGR: red square
    x[:, 1][lab == 2] += 100
    opt = build_optimizer(net.get_parameter_groups(), 2e-3, 5e-4, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, terms = seg_loss(net(x), lab)
        assert len(terms) == 4
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_cli_train_resume_infer_crf_evaluate(data, tmp_path, capsys):
    run = tmp_path / "run"
    out = train_seg.main(parse(train_seg.get_args_parser, train_argv(data, run)))
    assert out["final"] == run / "checkpoint_final.pth"
    assert len(out["losses"]) == 4 and np.isfinite(out["losses"]).all()
    for name in ("args.json", "env.json", "log.txt", "metrics.jsonl", "checkpoint_last.pth",
                 "checkpoint_final.pth"):
        assert (run / name).is_file(), name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4] and len(recs[0]["loss_terms"]) == 4
    assert recs[0]["loss"] == pytest.approx(sum(recs[0]["loss_terms"]))
    final = torch.load(run / "checkpoint_final.pth", weights_only=True)
    assert "base.aspp.c0.weight" in final and final["base.aspp.c0.weight"].shape[0] == 3

    # a finished run is never overwritten silently
    with pytest.raises(RunDirError, match="finished run"):
        train_seg.main(parse(train_seg.get_args_parser, train_argv(data, run)))
    # extending a finished run must be explicit ...
    with pytest.raises(UserError, match="pass --extend"):
        train_seg.main(parse(train_seg.get_args_parser, train_argv(
            data, run, max_iters=6, extra=["--resume"])))
    # ... --resume --extend with a longer schedule continues from checkpoint_last (iteration 4)
    # and keeps the finished weights
    more = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, run, max_iters=6, extra=["--resume", "--extend", "--eval-list", "val"])))
    assert (run / "checkpoint_final_iter4.pth").is_file()
    assert len(more["losses"]) == 2
    # ... and, with --eval-list, predicts and scores val in the same command
    assert 0.0 <= more["eval"]["miou"] <= 1.0 and (run / "pred_val_eval.json").is_file()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4, 5, 6]
    # --stop-after leaves a resumable, unfinished run
    run3 = tmp_path / "run3"
    part = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, run3, max_iters=3, extra=["--stop-after", "1", "--amp", "bf16"])))
    assert part["final"] is None and not (run3 / "checkpoint_final.pth").exists()
    with pytest.raises(RunDirError, match="unfinished run"):
        train_seg.main(parse(train_seg.get_args_parser, train_argv(data, run3, max_iters=3)))
    rest = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, run3, max_iters=3, extra=["--resume", run3 / "checkpoint_last.pth"])))
    assert len(rest["losses"]) == 2 and rest["final"].is_file()

    # inference + CRF + evaluation on val
    pred = tmp_path / "val"
    res = infer_seg.main(parse(infer_seg.get_args_parser, [
        "--dataset", "custom", "--data_root", data, "--weights", run, "--out-dir", pred,
        "--crf", "--flip", "--num-workers", 0]))
    ids = (data / "val.txt").read_text().split()
    for folder in (pred, tmp_path / "val_crf"):
        for i in ids:
            m = np.array(Image.open(folder / f"{i}.png"))
            assert m.shape == (40, 56) and m.max() <= 2
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["miou_crf"] <= 1.0
    assert (tmp_path / "val_eval.json").is_file() and (tmp_path / "val_crf_eval.json").is_file()
    assert (tmp_path / "val_run" / "args.json").is_file()
    printed = capsys.readouterr().out
    assert "with CRF: mIoU" in printed and "without CRF: mIoU" in printed
    # resume: everything exists, nothing is recomputed, results are reused
    res2 = infer_seg.main(parse(infer_seg.get_args_parser, [
        "--dataset", "custom", "--data_root", data, "--weights", run / "checkpoint_final.pth",
        "--out-dir", pred, "--crf", "--flip", "--num-workers", 0]))
    assert res2["written"] == 0 and res2["miou"] == res["miou"]
    # other weights into the same folder would mix predictions: refused
    with pytest.raises(infer_seg.InferSegError, match="other settings"):
        infer_seg.main(parse(infer_seg.get_args_parser, [
            "--dataset", "custom", "--data_root", data, "--weights", run / "checkpoint_last.pth",
            "--out-dir", pred, "--num-workers", 0]))


def test_resume_matches_uninterrupted_run(data, tmp_path):
    """Killed after 2 of 5 iterations (--stop-after leaves what a kill leaves: the last
    checkpoint) and resumed: the final weights equal an uninterrupted run's bit for bit. The
    data order (utils/sampler.py) and the trained-BN statistics are part of the state."""
    full = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, tmp_path / "full", max_iters=5)))
    part = tmp_path / "part"
    train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, part, max_iters=5, extra=["--stop-after", "2"])))
    rest = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, part, max_iters=5, extra=["--resume"])))
    a = torch.load(full["final"], weights_only=True)
    b = torch.load(rest["final"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["losses"][2:] == rest["losses"]


def test_resume_start_batch_continues_the_epoch():
    """The sampler counts micro-batches of the global batch, n // batch per epoch: a checkpoint
    written with another split continues in its epoch after the images it has already used
    (published 5 x 2 on 1 process, 10 x 1 on 2 processes), without drifting over epochs."""
    from utils.sampler import InfiniteBatchSampler
    assert train_seg.resume_start_batch(300, 10582, 5, 2, 5, 2) == (600, "")
    # 1 process -> 2: 600 micro-batches of 5 = 3000 images, all in epoch 0
    start, note = train_seg.resume_start_batch(300, 10582, 5, 2, 10, 1)
    assert start == 300 and "epoch 0 after its 3000 images" in note and "drop_last" in note
    # n = 23: 4 batches of 5 (old) but 2 of 10 (new) per epoch; 7 iterations x 2 = 14 batches
    # of 5 = epoch 3, batch 2: 10 images into epoch 3 -> new batch 3 * 2 + 1 = 7
    start, note = train_seg.resume_start_batch(7, 23, 5, 2, 10, 1)
    assert start == 7 and "epoch 3 after its 10 images" in note
    old, new = InfiniteBatchSampler(23, 5, seed=0), InfiniteBatchSampler(23, 10, seed=0)
    assert new.batch(start) == old.batch(14) + old.batch(15)  # the same images, same epoch
    start, note = train_seg.resume_start_batch(3, 40, 10, 1, 4, 1)  # 30 images; 4 does not divide
    assert start == 7 and "from image 28: a few are seen twice" in note
    assert "effective batch changed" in note


def test_resume_with_another_batch_split(data, tmp_path):
    """A checkpoint of 2 x 2 accumulated (1 process) resumed as 4 x 1 (as on 2 processes): the
    run continues in the checkpoint's epoch, says so, and finishes."""
    run = tmp_path / "run"
    train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, run, max_iters=4, extra=["--stop-after", "2"])))
    rest = train_seg.main(parse(train_seg.get_args_parser, train_argv(
        data, run, max_iters=4, extra=["--resume", "--batch-size", 4, "--iter-size", 1])))
    # 6 images: 2 iterations x 2 micro-batches of 2 = epoch 1 (3 per epoch), 2 images in
    log = (run / "log.txt").read_text()
    assert "resuming with batch 4 x 1 accumulated (checkpoint: 2 x 2)" in log
    assert "continues in epoch 1 after its 2 images already seen (from image 0" in log
    assert rest["final"] is not None and len(rest["losses"]) == 2


def test_bad_mask_value_names_the_file(tmp_path):
    root = tmp_path / "d"
    make_dataset(root, n_train=2, n_val=1)
    m = np.zeros((40, 56), np.uint8)
    m[5, 5] = 7  # not a class of a 3-class dataset
    save_label_png(root / "pseudo" / "train_000.png", m)
    save_label_png(root / "pseudo" / "train_001.png", m)
    with pytest.raises(DataError, match=r"train_00[01]\.png has values \[7\]"):
        train_seg.main(parse(train_seg.get_args_parser,
                             train_argv(root, tmp_path / "r", max_iters=1)))


def test_resnet101_without_init_is_refused(data, tmp_path):
    args = parse(train_seg.get_args_parser, train_argv(data, tmp_path / "r", max_iters=1))
    args.arch = "deeplabv2_resnet101"
    with pytest.raises(train_seg.TrainSegError, match="deeplabv1_resnet101-coco.pth"):
        train_seg.main(args)


@pytest.mark.slow
def test_cli_errors_are_clear(data, tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "infer_seg.py", "--dataset", "custom", "--data_root",
                        str(data), "--weights", str(tmp_path / "none.pth"), "--out-dir",
                        str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "weights not found" in r.stderr
    r = subprocess.run([sys.executable, "train_seg.py", "--dataset", "custom", "--data_root",
                        str(data), "--mask-dir", str(data / "pseudo"), "--num-workers", "0",
                        "--run-dir", str(tmp_path / "r")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--init deeplabv1_resnet101-coco.pth" in r.stderr
