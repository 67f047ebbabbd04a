"""Distributed runs as a GPU cluster would run them, imitated on the CPU (gloo):

* every collective goes through utils/dist.py, which puts tensors where the backend needs them
  (NCCL takes CUDA tensors only; gloo, which these tests use, would hide a CPU tensor);
* ranks with very uneven work never wait on a collective (a 5 s --dist-timeout must not fire);
  inference joins no process group, and its rank 0 waits for the other ranks' files instead;
* a bad training file found by rank 0's check stops every rank with the same message;
* a run resumed on another number of processes continues with the same data;
* two "nodes" on 127.0.0.1 (two torchrun launchers, the pipeline scripts' NNODES/NODE_RANK).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
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
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uneven_ranks_never_wait_on_a_collective(tmp_path):
    """Rank 1 has nothing to do (its images are done), rank 0 has ~20 s of work; with a 5 s
    --dist-timeout a final barrier would abort the job. infer.py joins no process group: ranks
    finish alone (rank 0 then finds rank 1's files already written)."""
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
            "--scales", "1", "2", "3", "4", "--device", "cpu"]
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


@pytest.mark.slow
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


def test_inference_joins_no_process_group():
    """infer.py and infer_seg.py split the list by RANK / WORLD_SIZE and never join a process
    group: a rank that fails or finishes early can then never leave the others in a collective,
    and the multi-node evaluation waits on files (utils.dist.wait_for_outputs), not on NCCL."""
    joins = re.compile(r"\b(init_distributed|barrier|all_reduce_\w+|all_gather_object|"
                       r"broadcast_object|check_on_main|wrap_ddp)\s*\(")
    for name in ("infer.py", "infer_seg.py"):
        text = (REPO / name).read_text()
        assert not joins.findall(text), f"{name} calls {joins.findall(text)}"
        assert "launched_rank()" in text and "launched_world_size()" in text, name


def test_wait_for_outputs(tmp_path, monkeypatch):
    """Rank 0's wait: returns once every item is done, files appearing while it polls; after the
    timeout, one error that says how many are missing and which."""
    import threading
    from utils.errors import UserError
    names = [f"x{i}" for i in range(4)]
    done = lambda n: (tmp_path / n).is_file()  # noqa: E731

    def writer():
        for n in names:
            (tmp_path / n).write_text("")
    t = threading.Timer(0.3, writer)
    t.start()
    dist.wait_for_outputs(names, done, what="files", timeout_s=30, poll_s=0.05)
    t.join()
    with pytest.raises(UserError, match=r"waited 0 s \(--dist-timeout\) without a new file.* 2 "
                                        r"still missing, e.g. y0, y1"):
        dist.wait_for_outputs(names + ["y0", "y1"], done, what="files", timeout_s=0.3, poll_s=0.05)
    # a slow rank that keeps writing is waited for well beyond the timeout (its files reset it)
    slow = [f"z{i}" for i in range(8)]

    def slow_writer():
        for n in slow:
            time.sleep(0.15)
            (tmp_path / n).write_text("")
    t = threading.Thread(target=slow_writer)
    t0 = time.monotonic()
    t.start()
    dist.wait_for_outputs(slow, done, what="files", timeout_s=0.5, poll_s=0.02)
    t.join()
    assert time.monotonic() - t0 > 1.0  # 8 x 0.15 s: twice the timeout


def test_launched_rank_ignores_a_stray_rank(monkeypatch):
    """A RANK left in the environment of a single-process run must not shift its share of the
    list (ids[rank::1]) or make it skip rank 0's checks."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.launched_rank() == 0 and not dist.spans_nodes()
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.launched_rank() == 3 and dist.spans_nodes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert not dist.spans_nodes()


def test_check_on_main_sends_errors_that_cannot_be_rebuilt_as_their_message(monkeypatch):
    """An exception with a custom __init__ pickles but cannot be unpickled on the other ranks:
    they get a UserError with the same message instead of a TypeError traceback."""
    from data.pixels import PixelFormatError
    from utils.errors import UserError
    sent = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "is_main_process", lambda: True)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: sent.append(obj) or obj)
    err = PixelFormatError("saliency map", "/d/x.png", "16-bit palette")

    def check():
        raise err
    with pytest.raises(UserError) as info:
        dist.check_on_main(check)
    assert type(sent[0]) is UserError and str(sent[0]) == str(err) and str(info.value) == str(err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_file_stops_every_rank_with_one_message(tmp_path):
    """The training list's file check runs on rank 0 only (not N times the same I/O); its error
    reaches every rank, which raises it at once, prefixed with its rank: no rank is left waiting
    in a collective, none dies with a traceback."""
    from test_train import base_argv, make_tiny_dataset
    root = make_tiny_dataset(tmp_path / "data", n=8)
    (root / "JPEGImages" / "img_005.jpg").write_bytes(b"not a jpeg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py")] + base_argv(root, tmp_path / "runs", session="bad") + [
           "--dist-timeout", "60"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode != 0
    # Both ranks raise at once; torchrun SIGTERMs the other as soon as one has exited, so one
    # or both lines are printed, each whole (never interleaved) and with the same message
    errors = [line for line in r.stderr.splitlines() if "train.py: error:" in line]
    assert errors and all(re.fullmatch(r"train\.py: error: \[rank [01]\] [^\[]*", e)
                          for e in errors), r.stderr[-3000:]
    assert len({e.split("] ", 1)[1] for e in errors}) == 1 and "img_005" in errors[0]
    # torchrun's own launcher prints a ChildFailedError traceback of its frames; no frame of ours
    # (a worker's traceback) may appear
    ours = [line for line in r.stderr.splitlines()
            if line.strip().startswith('File "') and str(REPO) in line and ".venv" not in line]
    assert not ours, r.stderr[-3000:]
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_dead_node_stops_the_survivor_within_the_peer_timeout(tmp_path, how):
    """Two launchers on 127.0.0.1 train together (gloo, one process each, as two nodes would);
    node 1 dies mid-training (its launcher and worker killed), or freezes (SIGSTOP: its sockets
    stay open, so a collective would wait --dist-timeout, 2 hours by default). Node 0 must stop
    within --peer-timeout (6 s here; 180 s by default) plus a few beats, with one error line
    naming the lost rank, and no traceback of ours."""
    import signal
    from test_train import base_argv, make_tiny_dataset

    def tree(pid):  # a launcher and its workers (torchrun starts them in sessions of their own)
        kids = {}
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                kids.setdefault(int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]),
                                []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
        out, todo = [], [pid]
        while todo:
            out.append(todo.pop())
            todo += kids.get(out[-1], [])
        return out

    def signal_tree(pids, sig):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    root = make_tiny_dataset(tmp_path / "data", n=12)
    port = free_port()
    argv = base_argv(root, tmp_path / "runs", network="small_cls", session="two", iters=100000)
    argv[argv.index("--ckpt-every") + 1] = "100000"
    argv += ["--peer-timeout", "6"]
    procs, node1 = [], []
    for r in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(r), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
               str(port), str(REPO / "train.py")] + argv
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True))  # its own group: kill it whole
    metrics = tmp_path / "runs" / "two" / "metrics.jsonl"
    try:
        t0 = time.monotonic()
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() - t0 < 180 and procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.5)
        node1 = tree(procs[1].pid)  # the whole "node": launcher and worker
        signal_tree(node1, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t_dead = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        took = time.monotonic() - t_dead
    finally:
        for p in procs:
            pids = tree(p.pid) + (node1 if p is procs[1] else [])
            signal_tree(pids, signal.SIGKILL)
            signal_tree(pids, signal.SIGCONT)
            p.communicate()
    assert procs[0].returncode != 0
    assert took < 6 + 30, f"node 0 took {took:.0f} s to stop"
    errors = [line for line in err.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1, err[-3000:]
    assert re.search(r"\[rank 0\] lost (rank 1 on .*\(node 1\)|contact)", errors[0]), errors[0]
    if how == "frozen":  # found by the heartbeat alone
        assert "no heartbeat for" in errors[0] and "--peer-timeout 6" in errors[0], errors[0]
    ours = [line for line in err.splitlines()
            if line.strip().startswith('File "') and str(REPO) in line and ".venv" not in line]
    assert not ours, err[-3000:]


def test_heartbeat_counts_beats_not_clocks_and_ignores_finished_ranks():
    """The heartbeat on an in-process store: a rank whose counter stands still past the timeout
    is named; one that beats, or that finished (done), is not."""
    import torch.distributed as tdist
    store = tdist.HashStore()
    lost = []
    hb = dist.Heartbeat(store, rank=0, world=3, timeout=0.3, interval=0.05, on_lost=lost.append)
    store.set("host/1", "nodeB (node 1)")
    assert hb.lost() is None  # first sight of every peer
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        store.add("beat/1", 1)  # rank 1 alive; rank 2 silent
        time.sleep(0.05)
        why = hb.lost()
        if why:
            break
    assert why and why.startswith("lost rank 2 on its node: no heartbeat for"), why
    store.set("done/2", "1")  # rank 2 had finished: not lost
    store.add("beat/1", 1)
    assert hb.lost() is None
    store.add("beat/1", 0)
    time.sleep(0.4)
    assert hb.lost().startswith("lost rank 1 on nodeB (node 1)")
