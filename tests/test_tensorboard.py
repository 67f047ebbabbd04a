"""--tensorboard (utils/tensorboard.py): the event files hold what metrics.jsonl holds, plus CAM
overlays at each checkpoint, read back with TensorBoard's own reader; the flag changes nothing in
the run itself; without the package it is one line before any compute."""
import argparse
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import train  # noqa: E402
import train_seg  # noqa: E402
from tools import make_demo_dataset as demo  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.tensorboard import FOLDER  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("board") / "data"
    return demo.write_dataset(root, num_train=8, num_val=0, seed=0,
                              settings=demo.Settings(size=48), progress=False)


def parse(module, argv):
    return argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(
        [str(a) for a in argv])


def argv(data_root, save_root, session, *extra, iters=4):
    return ["--dataset", "custom", "--data-root", data_root, "--train-list", "train",
            "--network", "small_eps", "--crop-size", 32, "--resize-size", 32, 48,
            "--batch-size", 4, "--max-iters", iters, "--num-workers", 0, "--log-every", 1,
            "--ckpt-every", 2, "--save-root", save_root, "--session", session, "--device", "cpu",
            *extra]


def events(run_dir):
    acc = EventAccumulator(str(run_dir / FOLDER), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_the_same_scalars_as_metrics_jsonl_and_cam_overlays(data_root, tmp_path):
    run = train.main(parse(train, argv(data_root, tmp_path, "board", "--tensorboard")))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = events(run)
    keys = sorted(k for k in records[0] if k != "iter")
    assert sorted(acc.Tags()["scalars"]) == keys  # loss, loss_cls, loss_sal, lr, ...
    for key in keys:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["iter"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    # CAM overlays of 4 training images (32-px crops, side by side) at each checkpoint
    assert acc.Tags()["images"] == ["cams"]
    shots = acc.Images("cams")
    assert [s.step for s in shots] == [2, 4]
    strip = np.asarray(Image.open(io.BytesIO(shots[0].encoded_image_string)))
    assert strip.shape == (32, 4 * 32, 3) and strip.std() > 10
    # and the run is the one without the flag, bit for bit
    plain = train.main(parse(train, argv(data_root, tmp_path, "plain")))
    a = torch.load(run / train.FINAL_NAME, weights_only=True)
    b = torch.load(plain / train.FINAL_NAME, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_has_each_step_once(data_root, tmp_path):
    part = argv(data_root, tmp_path, "part", "--tensorboard")
    train.main(parse(train, part + ["--stop-after", "3"]))  # checkpoint at 2, records up to 3
    run = train.main(parse(train, part + ["--resume"]))    # from 2: step 3's events are purged
    assert [e.step for e in events(run).Scalars("loss")] == [1, 2, 3, 4]


def test_train_seg_writes_its_scalars(tmp_path):
    from test_train_seg import make_dataset, train_argv

    make_dataset(tmp_path / "seg")
    out = train_seg.main(parse(train_seg, train_argv(tmp_path / "seg", tmp_path / "run",
                                                     max_iters=2, extra=["--tensorboard"])))
    acc = events(out["run_dir"])
    assert {"loss", "lr", "loss_terms/0"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_missing_package_is_one_line(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    rc = run_cli(train.get_args_parser, train.main,
                 argv=[str(a) for a in argv(data_root, tmp_path, "none", "--tensorboard")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "--tensorboard needs the tensorboard package: pip install -r " \
           "requirements-tensorboard.txt" in err[0]
    assert not (tmp_path / "none").exists()  # refused before the run directory was made


def test_only_utils_tensorboard_imports_it_and_only_when_asked():
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    found = []
    for path in repo.rglob("*.py"):
        rel = path.relative_to(repo)
        if rel.parts[0] in ("tests", ".venv") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "tensorboard" or n.startswith("torch.utils.tensorboard")
                   for n in names):
                found.append((str(rel), node.col_offset > 0))  # inside a function
    assert found and all(f == "utils/tensorboard.py" and nested for f, nested in found), found
