"""train.py on a tiny generated dataset in the VOC layout ('custom'), with the small CPU nets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.checkpoint import CheckpointError
from utils.cli import run_cli
from utils.device import DeviceError
from utils.errors import UserError
from utils.run import RunDirError
import train
from data.datasets import DataError
from data.registry import get_dataset
from network import build_network

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("red", "green", "blue")
COLORS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))


def make_tiny_dataset(root: Path, n: int = 12, seed: int = 0) -> Path:
    """n images (sizes vary around 40 px) with one or two coloured squares on noise; the
    saliency map marks the squares. Layout: JPEGImages/, SALImages/, labels.txt,
    image_labels.txt, train.txt (a 'custom' dataset)."""
    rng = np.random.RandomState(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SALImages").mkdir()
    lines = []
    for i in range(n):
        w, h = int(rng.randint(32, 49)), int(rng.randint(32, 49))
        img = rng.randint(60, 160, (h, w, 3)).astype(np.uint8)
        sal = np.zeros((h, w), np.uint8)
        present = sorted(rng.choice(3, size=1 + i % 2, replace=False).tolist())
        for c in present:
            s = int(rng.randint(10, 16))
            y, x = int(rng.randint(0, h - s)), int(rng.randint(0, w - s))
            img[y:y + s, x:x + s] = COLORS[c]
            sal[y:y + s, x:x + s] = 255
        img_id = f"img_{i:03d}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{img_id}.jpg", quality=95)
        Image.fromarray(sal, mode="L").save(root / "SALImages" / f"{img_id}.png")
        lines.append(img_id + " " + " ".join(map(str, present)))
    names = "".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES))
    (root / "labels.txt").write_text("0 background\n" + names)
    (root / "image_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("".join(line.split()[0] + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "VOCtiny")


def base_argv(data_root, save_root, network="small_eps", session="run", iters=4, **extra):
    argv = ["--dataset", "custom", "--data_root", str(data_root), "--network", network,
            "--save_root", str(save_root), "--session", session, "--train_list", "train",
            "--crop_size", "32",
            "--resize_size", "32", "48", "--batch_size", "4", "--max_iters", str(iters),
            "--num_workers", "0", "--tau", "0.4", "--lam", "0.5", "--lr", "0.01",
            "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def parse(argv):
    import argparse
    return argparse.ArgumentParser(parents=[train.get_args_parser()], allow_abbrev=False).parse_args(argv)


def run_main(argv):
    return train.main(parse(argv))


def final_state(run_dir):
    return torch.load(run_dir / train.FINAL_NAME, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# command line, end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("network", ["small_cls", "small_eps"])
def test_cli_end_to_end(data_root, tmp_path, network):
    argv = base_argv(data_root, tmp_path / "runs", network=network, session=network, iters=3)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "train.py")] + argv, cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / network
    for name in ("args.json", "env.json", "log.txt", "metrics.jsonl", "loss.png",
                 train.LAST_NAME, train.FINAL_NAME):
        assert (run_dir / name).is_file(), name
    args = json.loads((run_dir / "args.json").read_text())
    assert args["network"] == network and args["momentum"] == 5e-4 and args["freeze_bn"] is False
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs] == [1, 2, 3]
    terms = ("loss_cls", "loss_sal") if network == "small_eps" else ("loss_cls",)
    for key in ("loss", *terms, "lr", "images_per_s", "mem_mb"):
        assert all(np.isfinite(r[key]) for r in recs), key
    assert recs[0]["lr"] == pytest.approx(0.01)  # step 0 uses the base lr
    assert recs[2]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9)
    if network == "small_eps":
        assert all(r["loss_sal"] > 0 for r in recs)
        assert all(r["loss"] == pytest.approx(r["loss_cls"] + r["loss_sal"]) for r in recs)
    else:  # the baseline's head has one loss term: no flat-zero saliency loss is logged
        assert all("loss_sal" not in r and r["loss"] == r["loss_cls"] for r in recs)
    # The final file is a plain state dict in the published layout (no "module."), strict-loadable.
    sd = final_state(run_dir)
    assert not any(k.startswith("module.") for k in sd)
    model = build_network(network, 3)
    model.load_state_dict(sd)
    assert sd["fc8.weight"].shape[0] == (4 if network == "small_eps" else 3)
    ckpt = torch.load(run_dir / train.LAST_NAME, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scaler", "iter", "rng", "args"} and ckpt["iter"] == 3
    assert "iter 3/3" in (run_dir / "log.txt").read_text()


def test_refuses_to_overwrite_a_finished_run(data_root, tmp_path):
    argv = base_argv(data_root, tmp_path, network="small_cls", iters=2)
    run_main(argv)
    before = (tmp_path / "run" / train.FINAL_NAME).read_bytes()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run_main(argv)
    assert (tmp_path / "run" / train.FINAL_NAME).read_bytes() == before
    # --resume on a finished run is a no-op that keeps the result, byte for byte.
    run_main(argv + ["--resume"])
    assert (tmp_path / "run" / train.FINAL_NAME).read_bytes() == before
    last = torch.load(tmp_path / "run" / train.LAST_NAME, weights_only=True)
    assert torch.equal(final_state(tmp_path / "run")["fc8.weight"], last["model"]["fc8.weight"])
    # Extending a finished run is explicit, and keeps the finished weights.
    longer = base_argv(data_root, tmp_path, network="small_cls", iters=3)
    with pytest.raises(CheckpointError, match="pass --extend"):
        run_main(longer + ["--resume"])
    assert (tmp_path / "run" / train.FINAL_NAME).read_bytes() == before
    run_main(longer + ["--resume", "--extend"])
    assert (tmp_path / "run" / "checkpoint_cls_iter2.pth").read_bytes() == before
    assert torch.load(tmp_path / "run" / train.LAST_NAME, weights_only=True)["iter"] == 3
    # An unfinished run (checkpoint but no final file) is not restarted without --resume either.
    run_main(base_argv(data_root, tmp_path, network="small_cls", session="part", iters=4,
                       stop_after=2))
    with pytest.raises(RunDirError, match="unfinished run"):
        run_main(base_argv(data_root, tmp_path, network="small_cls", session="part", iters=4))
    # Resuming needs a train.py checkpoint of the same network.
    with pytest.raises(CheckpointError, match="written with --network small_cls, not small_eps"):
        run_main(base_argv(data_root, tmp_path, session="part") + ["--resume"])
    with pytest.raises(CheckpointError, match="not a train.py checkpoint"):
        run_main(base_argv(data_root, tmp_path, network="small_cls", session="other")
                 + ["--resume", str(tmp_path / "run" / train.FINAL_NAME)])


# ---------------------------------------------------------------------------------------------
# resume and determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", ["small_cls", "small_eps"])
def test_resume_matches_uninterrupted_run(data_root, tmp_path, network):
    # 6 iterations over 12 images with batch 4: two epochs, so the resumed run also crosses an
    # epoch boundary. small_cls has dropout (torch RNG) and trained BN (running statistics).
    full = run_main(base_argv(data_root, tmp_path, network=network, session="full", iters=6,
                              ckpt_every=4))
    part = base_argv(data_root, tmp_path, network=network, session="part", iters=6, ckpt_every=4)
    run_main(part + ["--stop-after", "3"])
    assert not (tmp_path / "part" / train.FINAL_NAME).exists()
    assert torch.load(tmp_path / "part" / train.LAST_NAME, weights_only=True)["iter"] == 3
    run_main(part + ["--resume"])
    a, b = final_state(full), final_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics log of the resumed run has each iteration once and the same losses.
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rb] == list(range(1, 7))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_workers_do_not_change_the_samples(data_root, tmp_path):
    # Per-sample augmentation seeds: the same batches with 0 or 2 loader processes.
    a = run_main(base_argv(data_root, tmp_path, session="w0", iters=3))
    b = run_main(base_argv(data_root, tmp_path, session="w2", iters=3, num_workers=2))
    sa, sb = final_state(a), final_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# guards and errors before compute
# ---------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path, monkeypatch):
    import network.heads
    calls = {"n": 0}
    real = network.heads.cls_loss

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(network.heads, "cls_loss", poisoned)
    argv = base_argv(data_root, tmp_path, network="small_cls", iters=5)
    with pytest.raises(train.TrainingError, match="non-finite loss in iterations 3-3") as e:
        run_main(argv)
    last = tmp_path / "run" / train.LAST_NAME
    assert str(last) in str(e.value)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["iter"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                     if v.is_floating_point())
    assert not (tmp_path / "run" / train.FINAL_NAME).exists()
    # The guard also fires on a real divergence, before the weights become non-finite.
    monkeypatch.setattr(network.heads, "cls_loss", real)
    with pytest.raises(train.TrainingError, match="non-finite"):
        run_main(base_argv(data_root, tmp_path, network="small_cls", session="huge", iters=30,
                           lr=1e30))


def test_cli_reports_errors_cleanly(data_root, tmp_path, caplog):
    cli = lambda argv: run_cli(train.get_args_parser, train.main, argv=argv)  # noqa: E731
    code = cli(base_argv(data_root, tmp_path, network="resnet38_eps", iters=2))
    assert code == 2
    assert "--weights" in caplog.text and "ImageNet" in caplog.text
    with pytest.raises(SystemExit):  # unknown flags are argparse errors
        cli(base_argv(data_root, tmp_path) + ["--max_iter", "3"])


def test_wrong_class_count_in_weights(data_root, tmp_path):
    wrong = tmp_path / "voc_eps.pth"
    torch.save(build_network("small_eps", 20).state_dict(), wrong)  # 21 outputs (VOC EPS)
    with pytest.raises(UserError, match="small_eps for 20 classes") as e:
        run_main(base_argv(data_root, tmp_path, weights=wrong))
    assert "small_eps for the dataset's 3 classes needs other shapes" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    # A checkpoint with the right head fine-tunes (strict load).
    right = tmp_path / "tiny_eps.pth"
    torch.save(build_network("small_eps", 3).state_dict(), right)
    run_main(base_argv(data_root, tmp_path, session="ft", iters=1, weights=right))


def test_eps_needs_saliency(data_root, tmp_path):
    bare = tmp_path / "bare"
    (bare / "JPEGImages").mkdir(parents=True)
    for name in ("labels.txt", "image_labels.txt", "train.txt"):
        (bare / name).write_bytes((data_root / name).read_bytes())
    for p in (data_root / "JPEGImages").iterdir():
        (bare / "JPEGImages" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(train.TrainingError, match="trains with saliency maps"):
        run_main(base_argv(bare, tmp_path / "runs"))
    with pytest.raises(train.TrainingError, match="is not a folder"):
        run_main(base_argv(bare, tmp_path / "runs", saliency_root=bare / "nope"))
    run_main(base_argv(bare, tmp_path / "runs", network="small_cls", iters=1))  # cls needs none


def test_saliency_size_mismatch_and_missing_files(tmp_path):
    root = make_tiny_dataset(tmp_path / "d", n=8)
    sal = root / "SALImages" / "img_003.png"
    Image.fromarray(np.zeros((5, 40), np.uint8), mode="L").save(sal)  # another aspect ratio
    with pytest.raises(DataError, match=r"1 of 8 saliency maps have another aspect ratio .*"
                                        r"img_003 \(map 40x5"):
        run_main(base_argv(root, tmp_path / "runs"))
    assert not (tmp_path / "runs" / "run" / train.LAST_NAME).exists()
    sal.unlink()
    with pytest.raises(DataError, match="missing files"):
        run_main(base_argv(root, tmp_path / "runs"))
    run_main(base_argv(root, tmp_path / "runs", iters=1, skip_missing=True))


# ---------------------------------------------------------------------------------------------
# flags and defaults
# ---------------------------------------------------------------------------------------------
def test_published_command_line_and_registry_defaults(tmp_path):
    # The published voc12_eps.sh flags, with only the script name changed.
    args = parse(["--dataset", "voc12", "--train_list", "metadata/voc12/train_aug.txt",
                  "--session", "voc12_eps", "--network", "network.resnet38_eps",
                  "--data_root", str(tmp_path), "--saliency_root", str(tmp_path),
                  "--weights", "x.params", "--crop_size", "448", "--max_iters", "20000",
                  "--batch_size", "8", "--tau", "0.4", "--num_workers", "8"])
    args = train.resolve_args(args, get_dataset("voc12"), 1)
    assert args.network == "resnet38_eps" and args.lam == 0.5 and args.resize_size == [256, 512]
    assert args.lr == 0.01 and args.wt_dec == 5e-4 and args.momentum == 5e-4
    # COCO recipe from the registry when flags are left out.
    # (tau / lam: the EPS head's values for COCO; the cls head has none and leaves them unset)
    coco = train.resolve_args(parse(["--dataset", "coco", "--data_root", str(tmp_path),
                                     "--network", "resnet38_eps", "--weights", "x.params"]),
                              get_dataset("coco"), 1)
    assert (coco.max_iters, coco.batch_size, coco.crop_size, coco.resize_size, coco.tau, coco.lam) \
        == (256500, 16, 321, [256, 448], 0.4, 0.9)
    cls = train.resolve_args(parse(["--dataset", "coco", "--data_root", str(tmp_path),
                                    "--weights", "x.params"]), get_dataset("coco"), 1)
    assert (cls.max_iters, cls.tau, cls.lam) == (256500, None, None)
    # Hyphenated aliases set the same fields; explicit values win over the registry.
    alias = train.resolve_args(parse(["--data-root", str(tmp_path), "--crop-size", "96",
                                      "--resize-size", "64", "128", "--max-iters", "7",
                                      "--batch-size", "2", "--wt-dec", "0", "--weights", "none"]),
                               get_dataset("voc12"), 1)
    assert (alias.crop_size, alias.resize_size, alias.max_iters, alias.batch_size, alias.wt_dec) \
        == (96, [64, 128], 7, 2, 0.0)
    # BN is frozen (published) on top of ImageNet weights, trained from scratch.
    assert args.freeze_bn is True and alias.freeze_bn is False
    with pytest.raises(train.TrainingError, match="unknown --network"):
        train.resolve_args(parse(["--data_root", "x", "--network", "resnet50_eps"]), get_dataset("voc12"), 1)
    with pytest.raises(train.TrainingError, match="MIN_LONG"):
        train.resolve_args(parse(["--data_root", "x", "--resize_size", "512", "256"]), get_dataset("voc12"), 1)
    help_text = " ".join(train.get_args_parser().format_help().split())
    assert "momentum slot" in help_text and "published" in help_text


def test_speed_flags(data_root, tmp_path):
    # bf16 autocast (CPU), channels_last and trunk checkpointing run through the same loop.
    run_dir = run_main(base_argv(data_root, tmp_path, iters=2, amp="bf16", channels_last=True,
                                 checkpointing=True))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in recs)
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        run_main(base_argv(data_root, tmp_path, session="fp16", amp="fp16"))
