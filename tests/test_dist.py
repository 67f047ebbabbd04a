"""Distributed runs as a GPU cluster would run them, imitated on the CPU (gloo):

* every collective goes through utils/dist.py, which puts tensors where the backend needs them
  (NCCL takes CUDA tensors only; gloo, which these tests use, would hide a CPU tensor);
* ranks with very uneven work never wait on a collective (a 5 s --dist-timeout must not fire);
* a run resumed on another number of processes continues with the same data;
* two "nodes" on 127.0.0.1 (two torchrun launchers, the pipeline scripts' NNODES/NODE_RANK).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import dist

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")

# torch.distributed calls that move data between processes or manage the group.
COLLECTIVES = re.compile(
    r"\b(all_reduce|all_gather|all_gather_object|broadcast|broadcast_object_list|reduce|"
    r"reduce_scatter|gather|scatter|all_to_all|barrier|monitored_barrier|send|recv|isend|irecv|"
    r"init_process_group|destroy_process_group|new_group)\s*\(")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_collective_outside_utils_dist():
    """A collective anywhere else could get a CPU tensor under NCCL, or escape --dist-timeout:
    no other module imports torch.distributed or calls one of its collectives."""
    imports = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed\b|"
                         r"from torch import distributed)", re.M)
    calls = re.compile(r"torch\.distributed\.(" + COLLECTIVES.pattern[3:])
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests") or rel == Path("utils/dist.py"):
            continue
        text = path.read_text()
        for m in list(imports.finditer(text)) + list(calls.finditer(text)):
            offenders.append(f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0).strip()}")
    assert not offenders, "torch.distributed used outside utils/dist.py:\n" + "\n".join(offenders)


def test_collectives_move_tensors_to_the_backend_device(monkeypatch):
    """Under NCCL every collective tensor must be on the GPU: all_reduce_sum hands the backend a
    copy on collective_device() (the GPU under NCCL), whatever device the caller's tensor is on,
    and gives the result back on the caller's device."""
    monkeypatch.setattr(dist, "collective_device", lambda: torch.device("meta"))
    assert dist.to_collective(torch.ones(3)).device == torch.device("meta")
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "collective_device", lambda: torch.device("cpu"))
    real = dist.to_collective
    monkeypatch.setattr(dist, "to_collective", lambda t: seen.append("moved") or real(t))
    monkeypatch.setattr(dist.dist, "all_reduce", lambda t, op=None: seen.append("reduced") or t.mul_(2))
    x = torch.ones(3)
    assert torch.equal(dist.all_reduce_sum(x), torch.full((3,), 2.0)) and torch.equal(x, torch.ones(3))
    assert torch.equal(dist.all_reduce_mean(x), torch.ones(3))
    assert seen == ["moved", "reduced"] * 2


def test_timeout_flag_everywhere():
    """Every distributed entry point has --dist-timeout, long by default (recorded in args.json
    like every flag)."""
    import importlib
    for name in ("train", "infer", "train_seg", "infer_seg"):
        actions = {a.dest: a for a in importlib.import_module(name).get_args_parser()._actions}
        assert actions["dist_timeout"].default == dist.DEFAULT_TIMEOUT_S >= 3600, name


# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_uneven_ranks_never_wait_on_a_collective(tmp_path):
    """Rank 1 has nothing to do (its images are done), rank 0 has ~20 s of work; with a 5 s
    --dist-timeout a final barrier would abort the job. infer.py has none: ranks finish alone."""
    from test_infer import IDS, make_checkpoint, make_dataset
    import numpy as np
    from PIL import Image
    root = make_dataset(tmp_path / "data")
    ids = [f"img_{i:02d}" for i in range(16)]
    rng = np.random.default_rng(0)
    for i in ids:  # larger images: rank 0's share takes a while
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 240)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "image_labels.txt").write_text("".join(f"{i} 0 2\n" for i in ids + IDS))
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    ckpt = make_checkpoint(tmp_path / "eps.pth", "small_eps")
    out = tmp_path / "png"
    base = [str(REPO / "infer.py"), "--dataset", "custom", "--img_root", str(root), "--weights",
            str(ckpt), "--png-dir", str(out), "--num-workers", "0", "--writer-threads", "1",
            "--scales", "1", "2", "3", "4"]
    # rank 1's share (ids[1::2]) done by a single-process run of just those ids
    (root / "rank1.txt").write_text("\n".join(ids[1::2]) + "\n")
    r = subprocess.run([sys.executable] + base + ["--infer_list", str(root / "rank1.txt")],
                       env=ENV, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *base, "--dist-timeout", "5"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    log = (out / "log.txt").read_text()
    seconds = float(re.search(r"rank 0: 8 images in ([\d.]+) s", log).group(1))
    assert seconds > 5, f"rank 0 worked only {seconds} s: the test would not see a barrier"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)


@pytest.mark.timeout(400)
def test_resume_on_another_world_size(tmp_path):
    """Killed after 2 of 4 iterations on 2 processes, resumed on 1: the data order is the same
    (the sampler splits one global order), so with no random layer (small_eps, frozen BN) the
    result equals a 1-process run; a warning says the dropout streams were reseeded."""
    from test_train import base_argv, final_state, make_tiny_dataset, run_main
    root = make_tiny_dataset(tmp_path / "data", n=12)
    argv = lambda s, **k: base_argv(root, tmp_path / "runs", network="small_eps", session=s,  # noqa: E731
                                    iters=4, freeze_bn=True, **k)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py")] + argv("moved", stop_after=2)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run_main(argv("moved") + ["--resume"])
    assert "written by 2 processes, this run has 1" in (tmp_path / "runs" / "moved" / "log.txt").read_text()
    single = run_main(argv("single"))
    a, b = final_state(tmp_path / "runs" / "moved"), final_state(single)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
