"""Outputs record the identity of the weights that made them (utils/provenance.py): a checkpoint
retrained under the same name (train.py / train_seg.py --resume --extend) never leaves its old
pseudo-masks, scores or DeepLab run counted as done."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch

import evaluate
import infer
import infer_seg
import train_seg
from test_infer import make_checkpoint, make_dataset
from utils import fetch, provenance


@pytest.fixture
def env(tmp_path):
    import numpy as np
    from PIL import Image

    from utils.io import save_label_png
    root = make_dataset(tmp_path / "data")
    for p in (root / "JPEGImages").glob("*.jpg"):  # ground truth, for the evaluation
        w, h = Image.open(p).size
        save_label_png(root / "SegmentationClass" / f"{p.stem}.png", np.ones((h, w), np.uint8))
    (tmp_path / "run").mkdir()
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint_cls.pth", "small_eps", seed=1)
    return dict(root=root, tmp=tmp_path, ckpt=ckpt)


def run_infer(env, *extra):
    args = infer.get_args_parser().parse_args([str(a) for a in (
        "--dataset", "custom", "--img_root", env["root"], "--weights", env["ckpt"],
        "--png-dir", env["tmp"] / "result" / "png", "--num-workers", 0, "--writer-threads", 1,
        "--device", "cpu", *extra)])
    infer.main(args)
    return args


def replace_weights(path, seed):
    """What train.py --resume --extend does to checkpoint_cls.pth: other weights, same name."""
    tmp = path.with_name("other.pth")
    make_checkpoint(tmp, "small_eps", seed=seed)
    os.replace(tmp, path)


def test_file_identity_reuses_the_hash_and_sees_content_not_time(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"abc")
    a = provenance.file_identity(p)
    assert a["sha256"] == fetch.sha256_of(p) and a["size"] == 3
    fake = dict(a, sha256="recorded")  # same size and time: the recorded hash is trusted
    assert provenance.file_identity(p, fake)["sha256"] == "recorded"
    os.utime(p, ns=(a["mtime_ns"] + 10 ** 9, a["mtime_ns"] + 10 ** 9))  # touched: same content
    assert provenance.same(a, provenance.file_identity(p, a))
    p.write_bytes(b"abd")
    assert not provenance.same(a, provenance.file_identity(p, a))


def test_pseudo_masks_of_a_retrained_checkpoint_are_refused(env):
    out = env["tmp"] / "result" / "png"
    run_infer(env)
    rec = json.loads((out / infer.SETTINGS_FILE).read_text())
    ident = rec["inputs"][str(env["ckpt"].resolve())]
    assert ident["sha256"] == fetch.sha256_of(env["ckpt"]) and ident["name"] == "checkpoint_cls.pth"
    run_infer(env)  # same weights: resumes (nothing to do)
    shutil.copy2(env["ckpt"], env["tmp"] / "copy.pth")
    os.utime(env["ckpt"])  # a touch is no change
    run_infer(env)
    replace_weights(env["ckpt"], seed=7)
    with pytest.raises(infer.InferError, match=r"holds results made by another checkpoint_cls\.pth "
                                               r"\(.* then, .* now: retrained or replaced\); pass "
                                               r"--overwrite"):
        run_infer(env)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    run_infer(env, "--overwrite")  # recomputes with the new weights and records them
    rec = json.loads((out / infer.SETTINGS_FILE).read_text())
    assert rec["inputs"][str(env["ckpt"].resolve())]["sha256"] == fetch.sha256_of(env["ckpt"])
    assert sorted(before) == sorted(p.name for p in out.glob("*.png"))
    run_infer(env)


def test_scores_and_deeplab_runs_follow_their_inputs_upstream(env):
    """evaluate.py records the predictions it scored, train_seg.py the pseudo-masks and the init;
    a changed checkpoint upstream makes both stale (provenance.check), and a DeepLab run is
    never resumed on other inputs."""
    out = env["tmp"] / "result" / "png"
    run_infer(env)
    js = env["tmp"] / "result" / "train_miou.json"
    argv = ["--dataset", "custom", "--datalist", "train", "--data-root", str(env["root"]),
            "--pred_dir", str(out), "--save_path", str(js.with_suffix(".txt")),
            "--num-workers", "0", "--no-progress"]
    evaluate.main(evaluate.get_args_parser().parse_args(argv))
    record = json.loads(js.read_text())
    assert list(record["inputs"]) == [str(out.resolve())]
    assert provenance.check(js) is None
    # DeepLab on these masks (the tiny arch, two iterations)
    run_dir = env["tmp"] / "deeplab"
    seg = ["--dataset", "custom", "--data_root", str(env["root"]), "--mask-dir", str(out),
           "--train-list", "train", "--arch", "deeplabv2_small", "--init", "none",
           "--max-iters", "2", "--batch-size", "2", "--iter-size", "1", "--crop-size", "32",
           "--num-workers", "0", "--log-every", "1", "--ckpt-every", "1", "--save-every", "0",
           "--run-dir", str(run_dir), "--device", "cpu", "--stop-after", "1"]
    parse = lambda a: argparse.ArgumentParser(parents=[train_seg.get_args_parser()]).parse_args(a)  # noqa: E731
    train_seg.main(parse(seg))
    inputs = json.loads((run_dir / "inputs.json").read_text())
    assert list(inputs["inputs"]) == [str(out.resolve())] and inputs["init"] is None
    assert provenance.check(run_dir / "inputs.json") is None
    replace_weights(env["ckpt"], seed=7)
    for record in (js, run_dir / "inputs.json"):
        why = provenance.check(record)
        assert why and str(env["ckpt"].resolve()) in why and "changed since" in why, why
    with pytest.raises(train_seg.TrainSegError, match=r"was started on other inputs: .*"
                                                      r"checkpoint_cls\.pth changed since"):
        train_seg.main(parse(seg + ["--resume"]))


def test_segmentation_predictions_of_a_retrained_deeplab_are_refused(tmp_path, capsys):
    from network.deeplab import build_deeplab
    from test_train import make_tiny_dataset
    root = make_tiny_dataset(tmp_path / "data", n=3)
    weights = tmp_path / "deeplab" / "checkpoint_final.pth"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(), weights)
    argv = ["--dataset", "custom", "--data_root", str(root), "--list", "train", "--weights",
            str(weights), "--out-dir", str(tmp_path / "deeplab" / "val"), "--num-workers", "0",
            "--device", "cpu", "--no-evaluate"]
    parse = lambda a: argparse.ArgumentParser(parents=[infer_seg.get_args_parser()]).parse_args(a)  # noqa: E731
    infer_seg.main(parse(argv))
    record = tmp_path / "deeplab" / "val" / provenance.RECORD_NAME
    assert provenance.check(record) is None
    torch.manual_seed(1)  # train_seg.py --resume --extend: a new checkpoint_final.pth
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(), weights)
    assert "checkpoint_final.pth changed since" in provenance.check(record)
    with pytest.raises(infer_seg.InferSegError, match=r"holds predictions made by another "
                                                      r"checkpoint_final\.pth.*pass --overwrite"):
        infer_seg.main(parse(argv))
    infer_seg.main(parse(argv + ["--overwrite"]))
    assert provenance.check(record) is None
