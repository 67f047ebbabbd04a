"""The bash pipelines script/{voc12,coco}_{cls,eps}.sh, end to end on tiny generated datasets.

Each script runs with the same environment overrides a user would set (tiny iteration counts, the
small CPU backbones, one inference scale), so what is tested is the real sequencing: the stages,
the flags they pass, skip-on-rerun, resume of an unfinished run, and the input checks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "script"

# Every variable the scripts read: cleared first so that nothing leaks in from the caller's shell.
SCRIPT_VARS = (
    "DATASET DATASET_ROOT SALIENCY_ROOT GT_DIR WEIGHTS SEG_INIT METADATA_DIR SAVE_ROOT SESSION "
    "NGPUS DEVICE NUM_WORKERS NETWORK TRAIN_LIST CROP RESIZE MAX_ITERS BATCH LR WT_DEC TAU LAM "
    "INFER_LIST THR VIS_NUM SAVE_CAMS SEG_LIST SEG_EVAL_LIST SEG_GT_DIR SEG_ARCH SEG_ITERS "
    "SEG_BATCH SEG_ITER_SIZE SEG_CROP SEG_LR SEG_CRF SEG_CRF_WORKERS TRAIN_ARGS INFER_ARGS "
    "EVAL_ARGS SEG_ARGS SEGINFER_ARGS STAGES SKIP_SEG PYTHON NNODES NODE_RANK MASTER_ADDR "
    "MASTER_PORT SEG_NGPUS CLS_NGPUS ITER_SIZE CHECK_ONLY RDZV_TIMEOUT CHECKPOINT OUT_DIR NPROC LIST").split()

TINY = dict(
    PYTHON=sys.executable, NGPUS="1", DEVICE="cpu", NUM_WORKERS="0", WEIGHTS="none",
    MAX_ITERS="2", BATCH="4", CROP="32", RESIZE="32 48", VIS_NUM="2",
    INFER_ARGS="--scales 1.0 --writer-threads 1", EVAL_ARGS="--num-workers 0 --no-progress",
    SEG_ARCH="deeplabv2_small", SEG_INIT="none", SEG_ITERS="2", SEG_BATCH="2",
    SEG_ITER_SIZE="1", SEG_CROP="32", SEG_CRF="0", SEG_CRF_WORKERS="0",
    OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")

N_TRAIN, N_TRAIN_AUG, N_VAL = 6, 10, 4


def run_script(name: str, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(TINY)
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(SCRIPT / name)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def result_rows(stdout: str) -> dict:
    """{row label: (list, published, this run)} from the markdown table printed at the end."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and not cells[0].startswith("---"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def is_number(s: str) -> bool:
    return re.fullmatch(r"\d+\.\d\d", s) is not None


# ------------------------------------------------------------------------------------------------
# Tiny datasets: the demo generator in the VOC layout, and the same images in the COCO layout.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scripts") / "demo"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_dataset.py"), "--out", str(root),
                    "--num-train", str(N_TRAIN_AUG), "--num-val", str(N_VAL), "--size", "40"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return root


@pytest.fixture(scope="module")
def voc(demo) -> dict:
    """VOC layout; the metadata folder makes train a strict subset of train_aug, as in VOC."""
    meta = demo.parent / "voc_meta"
    meta.mkdir()
    for name in ("labels.txt", "image_labels.txt", "val.txt"):
        shutil.copy(demo / name, meta / name)
    ids = (demo / "train.txt").read_text().split()
    (meta / "train_aug.txt").write_text("\n".join(ids) + "\n")
    (meta / "train.txt").write_text("\n".join(ids[:N_TRAIN]) + "\n")
    return dict(DATASET_ROOT=demo, METADATA_DIR=meta)


@pytest.fixture(scope="module")
def coco(demo) -> dict:
    """COCO-2014 layout: train2014/COCO_train2014_<12 digits>.jpg, SegmentationClass/<split>/."""
    root, meta = demo.parent / "coco", demo.parent / "coco_meta"
    meta.mkdir()
    shutil.copy(demo / "labels.txt", meta / "labels.txt")
    rename = {}
    for split, src_list in (("train2014", "train.txt"), ("val2014", "val.txt")):
        for sub in (split, f"SegmentationClass/{split}", "SALImages"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        new_ids = []
        for k, old in enumerate((demo / src_list).read_text().split()):
            new = f"COCO_{split}_{k + 1:012d}"
            rename[old] = new
            new_ids.append(new)
            shutil.copy(demo / "JPEGImages" / f"{old}.jpg", root / split / f"{new}.jpg")
            shutil.copy(demo / "SegmentationClassAug" / f"{old}.png",
                        root / "SegmentationClass" / split / f"{new}.png")
            shutil.copy(demo / "SALImages" / f"{old}.png", root / "SALImages" / f"{new}.png")
        (meta / f"{split[:-4]}.txt").write_text("\n".join(new_ids) + "\n")
    lines = [line.split(maxsplit=1) for line in (demo / "image_labels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    (meta / "image_labels.txt").write_text(
        "".join(f"{rename[i]} {rest}\n" for i, rest in lines if i in rename))
    return dict(DATASET_ROOT=root, METADATA_DIR=meta)


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------
def coco_like_init(path: Path) -> Path:
    """A deeplabv1_resnet101-coco.pth-shaped file for deeplabv2_small: backbone keys without
    "base.", a 91-class fc (the COCO classifier, dropped when it loads)."""
    import torch
    from network.deeplab import build_deeplab
    torch.manual_seed(0)
    sd = {k[len("base."):]: v for k, v in build_deeplab("deeplabv2_small", 21).state_dict().items()
          if not k.startswith("base.aspp.")}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(91, 256, 1, 1), torch.zeros(91)
    torch.save(sd, path)
    return path


@pytest.mark.slow
def test_voc12_eps_all_stages_then_rerun_skips(voc, tmp_path):
    import hashlib
    init = coco_like_init(tmp_path / "deeplabv1_small-coco.pth")
    env = dict(voc, SAVE_ROOT=tmp_path, NETWORK="small_eps", SEG_CRF=1, SEG_INIT=init)
    out = ok(run_script("voc12_eps.sh", **env))
    run = tmp_path / "voc12_eps"
    assert (run / "checkpoint_cls.pth").is_file()
    # pseudo-masks: the train list (stage 2), then the rest of train_aug for DeepLab (stage 4)
    assert len(list((run / "result" / "png").glob("*.png"))) == N_TRAIN_AUG
    assert len(list((run / "result" / "vis").glob("*.png"))) == 2
    assert (run / "result" / "train_miou.json").is_file()
    assert (run / "deeplab" / "checkpoint_final.pth").is_file()
    assert len(list((run / "deeplab" / "val").glob("*.png"))) == N_VAL
    assert len(list((run / "deeplab" / "val_crf").glob("*.png"))) == N_VAL
    rows = result_rows(out)
    pseudo = rows["pseudo-masks (thr 0.20, no CRF)"]
    assert pseudo[:2] == ("train", "69.22") and is_number(pseudo[2])
    assert rows["DeepLab-v2"][:2] == ("val", "70.9") and is_number(rows["DeepLab-v2"][2])
    assert is_number(rows["DeepLab-v2 + CRF"][2])
    # the init the DeepLab numbers come from: name, size, sha256 (train_seg.py's inputs.json)
    digest = hashlib.sha256(init.read_bytes()).hexdigest()
    assert rows["DeepLab-v2 init"] == (init.name, "-",
                                       f"{init.stat().st_size} bytes, sha256 {digest[:16]}")
    assert json.loads((run / "deeplab" / "inputs.json").read_text())["init"]["sha256"] == digest

    # Rerun: finished stages are skipped, nothing is recomputed, and inputs that only the skipped
    # stages need (the initial weights) may be gone by now.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")
              if p.suffix in (".pth", ".png") or p.name.endswith(("_miou.txt", "_eval.txt"))}
    out2 = ok(run_script("voc12_eps.sh", **{**env, "WEIGHTS": "/nonexistent/init.params",
                                            "SEG_INIT": "/nonexistent/deeplab.pth"}))
    for stage in ("train", "eval", "seg", "segeval"):
        assert f"skip {stage}:" in out2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result_rows(out2) == rows


@pytest.mark.slow
def test_voc12_cls_default_stages(voc, tmp_path):
    out = ok(run_script("voc12_cls.sh", **voc, SAVE_ROOT=tmp_path, NETWORK="small_cls"))
    run = tmp_path / "voc12_cls"
    assert len(list((run / "result" / "png").glob("*.png"))) == N_TRAIN  # train list only
    assert not (run / "deeplab").exists()  # DeepLab stages are opt-in for the baseline
    pseudo = result_rows(out)["pseudo-masks (thr 0.20, no CRF)"]
    assert pseudo[:2] == ("train", "47.05") and is_number(pseudo[2])


@pytest.mark.slow
def test_coco_eps_all_stages(coco, tmp_path):
    out = ok(run_script("coco_eps.sh", **coco, SAVE_ROOT=tmp_path, NETWORK="small_eps"))
    run = tmp_path / "coco_eps"
    assert len(list((run / "result" / "png").glob("COCO_train2014_*.png"))) == N_TRAIN_AUG
    assert len(list((run / "deeplab" / "val").glob("COCO_val2014_*.png"))) == N_VAL
    rows = result_rows(out)
    assert rows["pseudo-masks (thr 0.20, no CRF)"][1] == "37.15"
    assert is_number(rows["pseudo-masks (thr 0.20, no CRF)"][2])
    assert is_number(rows["DeepLab-v2"][2]) and "DeepLab-v2 + CRF" not in rows


@pytest.mark.slow
def test_coco_cls_default_stages(coco, tmp_path):
    out = ok(run_script("coco_cls.sh", **coco, SAVE_ROOT=tmp_path, NETWORK="small_cls"))
    pseudo = result_rows(out)["pseudo-masks (thr 0.20, no CRF)"]
    assert pseudo[1] == "31.23" and is_number(pseudo[2])
    assert (tmp_path / "coco_cls" / "result" / "train_miou.txt").is_file()


@pytest.mark.slow
def test_unfinished_training_is_resumed(voc, tmp_path):
    env = dict(voc, SAVE_ROOT=tmp_path, NETWORK="small_cls", STAGES="train", MAX_ITERS=3)
    ok(run_script("voc12_cls.sh", **env, TRAIN_ARGS="--stop-after 1"))  # a job slot ran out
    run = tmp_path / "voc12_cls"
    assert (run / "checkpoint_last.pth").is_file() and not (run / "checkpoint_cls.pth").exists()
    ok(run_script("voc12_cls.sh", **env))
    assert (run / "checkpoint_cls.pth").is_file()
    assert "resumed from" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_ngpus_launches_torchrun(voc, tmp_path):
    """NGPUS=2 goes through torchrun (gloo on the CPU); the global batch is split, not doubled."""
    out = ok(run_script("voc12_cls.sh", **voc, SAVE_ROOT=tmp_path, NETWORK="small_cls", NGPUS=2))
    run = tmp_path / "voc12_cls"
    assert "2 process(es) on cpu; per-process batch 2" in (run / "log.txt").read_text()
    assert len(list((run / "result" / "png").glob("*.png"))) == N_TRAIN
    assert is_number(result_rows(out)["pseudo-masks (thr 0.20, no CRF)"][2])


# ------------------------------------------------------------------------------------------------
# Input checks: bash stops before any Python runs, saying what to download and where
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script, override, expect", [
    ("voc12_eps.sh", dict(DATASET_ROOT="/nonexistent/VOC2012"), "VOCtrainval_11-May-2012.tar"),
    ("voc12_eps.sh", dict(SALIENCY_ROOT="/nonexistent/sal"), "PFAN saliency maps"),
    ("voc12_eps.sh", dict(WEIGHTS="/nonexistent/w.params"), "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"),
    ("voc12_eps.sh", dict(SEG_INIT="/nonexistent/d.pth"), "deeplabv1_resnet101-coco.pth"),
    ("voc12_cls.sh", dict(GT_DIR="/nonexistent/gt"), "SegmentationClassAug"),
    ("coco_eps.sh", dict(GT_DIR="/nonexistent/gt"), "make_coco_masks.py"),
    ("coco_cls.sh", dict(METADATA_DIR="/nonexistent/meta"), "make_cls_labels.py"),
    ("coco_cls.sh", dict(DATASET_ROOT="/nonexistent/coco"), "train2014.zip"),
    ("voc12_cls.sh", dict(STAGES="train bogus"), "unknown stage 'bogus'"),
    # a second node that defaulted to 127.0.0.1 would wait RDZV_TIMEOUT for a master of its own
    ("voc12_cls.sh", dict(NNODES="2", NODE_RANK="1"), "NNODES=2 needs MASTER_ADDR"),
    ("voc12_cls.sh", dict(MASTER_PORT="65534"), "stages use MASTER_PORT..MASTER_PORT+5"),
])
def test_missing_input_stops_at_once(voc, coco, tmp_path, script, override, expect):
    data = coco if script.startswith("coco") else voc
    proc = run_script(script, **{**data, "SAVE_ROOT": tmp_path / "runs", **override}, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_skip_seg_drops_the_deeplab_stages(voc, tmp_path):
    out = ok(run_script("voc12_eps.sh", **voc, SAVE_ROOT=tmp_path, STAGES="seg segeval",
                        SKIP_SEG=1, SEG_INIT="/nonexistent/d.pth", timeout=30))
    assert "stages: none" in out
    assert not (tmp_path / "voc12_eps").exists()


# ------------------------------------------------------------------------------------------------
# Preflight: everything checked before any compute, every problem at once, the plan printed
# ------------------------------------------------------------------------------------------------
def test_check_only_prints_the_plan_and_runs_nothing(voc, tmp_path):
    out = ok(run_script("voc12_eps.sh", **voc, SAVE_ROOT=tmp_path, NETWORK="small_eps",
                        CHECK_ONLY=1, MAX_ITERS="", BATCH="", CROP="", RESIZE="", timeout=60))
    plan = out[out.index("voc12_eps: 1 node(s) x 1 process(es) on cpu"):]
    # the recipe comes from the registry when the script does not override it
    assert "small_eps on voc12 train_aug (10 ids): 20000 iterations x batch 8" in plan
    assert "crop 448, resize 256-512" in plan and "tau 0.4, lam 0.5" in plan
    assert "deeplabv2_small on the train_aug pseudo-masks" in plan
    assert "nothing was run" in out and not (tmp_path / "voc12_eps").exists()


def test_every_missing_input_is_named_in_one_run(tmp_path):
    """An empty dataset root and missing weights: one run names all of them, with where to get
    each (README 'Downloads'), and starts nothing."""
    empty = tmp_path / "VOC2012"
    empty.mkdir()
    proc = run_script("voc12_eps.sh", DATASET_ROOT=empty, SAVE_ROOT=tmp_path / "runs", NETWORK="resnet38_eps",
                      WEIGHTS=tmp_path / "w.params", SEG_INIT=tmp_path / "d.pth", SEG_ARCH="",
                      timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    for expect in ("VOCtrainval_11-May-2012.tar", "PFAN saliency maps", "w.params",
                   "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "d.pth",
                   "deeplabv1_resnet101-coco.pth", "SegmentationClassAug"):
        assert expect in err, expect
    assert err.count("README 'Downloads'") >= 4
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def plan_of(out: str) -> dict:
    """{stage: (plan line, layout line or None)} from the printed plan."""
    stages, last = {}, None
    for line in out.splitlines():
        m = re.match(r"\s+(\w+:?)\s+(.*)$", line)
        if not m:
            continue
        if m.group(1) == "layout:":
            stages[last] = (stages[last][0], m.group(2))
        else:
            last = m.group(1)
            stages[last] = (m.group(2), None)
    return stages


LAYOUTS = [(n, 1) for n in range(1, 9)] + [(n, 2) for n in range(1, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("ngpus, nnodes", LAYOUTS)
def test_every_gpu_count_gets_a_layout_that_keeps_the_batch(voc, coco, tmp_path, ngpus, nnodes):
    """The README's commands for 1-8 GPUs and 2 nodes x 1-4 GPUs run as written: each training
    stage chooses its own processes and keeps its published effective batch (VOC 8, COCO 16,
    DeepLab 10) exactly; the plan shows each layout; evaluation is 1 process on node 0."""
    for script, data, batch in (("voc12_eps.sh", voc, 8), ("coco_eps.sh", coco, 16)):
        env = dict(data, SAVE_ROOT=tmp_path, NETWORK="small_eps", NGPUS=ngpus, NNODES=nnodes,
                   MASTER_ADDR="127.0.0.1", BATCH="", SEG_BATCH="", SEG_ITER_SIZE="",
                   CHECK_ONLY=1)
        plan = plan_of(ok(run_script(script, timeout=60, **env)))
        for stage, effective in (("train", batch), ("seg", 10)):
            line = plan[stage][1]
            m = re.search(r"on (\d+) of (\d+) (?:processes|GPUs)[^:]*: (\d+) = (\d+) x (\d+) x (\d+)",
                          line)
            assert m, line
            g, gpus, eff, b, p, a = map(int, m.groups())
            assert gpus == ngpus and g <= ngpus and p == g * nnodes and eff == effective
            assert b * p * a == effective, line
        assert plan["eval"][0].endswith("[1 process, node 0]")
        if nnodes > 1:
            assert plan["infer"][0].endswith(f"[{ngpus} process(es) per node x 2 nodes = {2 * ngpus}]")


@pytest.mark.slow
def test_gpu_counts_are_planned_and_overrides_kept(voc, tmp_path):
    """NGPUS=4: the classifier on 4 (8 = 2 x 4 x 1), DeepLab on 2 of 4 (10 = 5 x 2 x 1);
    SEG_NGPUS / CLS_NGPUS fix a stage's count, and one that cannot keep the batch is refused up
    front with the counts that can."""
    env = dict(voc, SAVE_ROOT=tmp_path, NETWORK="small_eps", BATCH="", SEG_BATCH="",
               SEG_ITER_SIZE="", CHECK_ONLY=1)
    plan = plan_of(ok(run_script("voc12_eps.sh", NGPUS=4, timeout=60, **env)))
    assert "x batch 8 (2 per process on 4)" in plan["train"][0]
    assert plan["seg"][1].startswith("DeepLab on 2 of 4 processes: 10 = 5 x 2 x 1")
    assert "4 processes cannot split 10" in plan["seg"][1]
    assert "x 10 x 1 accumulated (effective 10; 5 per process and pass on 2)" in plan["seg"][0]
    plan = plan_of(ok(run_script("voc12_eps.sh", NGPUS=8, SEG_NGPUS=1, CLS_NGPUS=2, ITER_SIZE=2,
                                 timeout=60, **env)))
    assert plan["train"][1].startswith("classifier on 2 of 8 processes: 8 = 2 x 2 x 2")
    assert "x 2 accumulated" in plan["train"][0]
    assert plan["seg"][1].startswith("DeepLab on 1 of 8 processes: 10 = 5 x 1 x 2")
    assert "SEG_NGPUS=1" in plan["seg"][1]
    proc = run_script("voc12_eps.sh", NGPUS=4, SEG_NGPUS=4, CLS_NGPUS=3, timeout=60, **env)
    assert proc.returncode == 2
    assert "over 3 processes (CLS_NGPUS=3)" in proc.stderr and "use 1, 2, 4, 8" in proc.stderr
    assert "over 4 processes (SEG_NGPUS=4)" in proc.stderr and "use 1, 2, 5, 10" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "voc12_eps").exists()


def free_port_range(n: int) -> int:
    """A port p such that p .. p + n - 1 are all free on 127.0.0.1 now."""
    import socket
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + n > 65535:
            continue
        socks = []
        try:
            for p in range(port, port + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_on_localhost(voc, tmp_path):
    """NNODES=2: two launchers on 127.0.0.1, as two machines would run the same script with their
    own NODE_RANK (one process each, gloo); the nodes train one model together."""
    port = free_port_range(6)  # stage k meets on MASTER_PORT + k
    env = dict(voc, SAVE_ROOT=tmp_path, NETWORK="small_cls", STAGES="train infer eval", NNODES=2,
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MAX_ITERS=3, RDZV_TIMEOUT=120)
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(TINY)
    procs = [subprocess.Popen(["bash", str(SCRIPT / "voc12_cls.sh")], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**full, **{k: str(v) for k, v in env.items()}, "NODE_RANK": str(r)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=360) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-4000:]
    run = tmp_path / "voc12_cls"
    log = (run / "log.txt").read_text()
    assert "2 process(es) on cpu; per-process batch 2" in log
    assert "weights identical on all 2 ranks" in log
    assert len(list((run / "result" / "png").glob("*.png"))) == N_TRAIN
    # single-process stages and the results table run on node 0 only
    assert is_number(result_rows(outs[0][0])["pseudo-masks (thr 0.20, no CRF)"][2])
    assert "| voc12_cls |" not in outs[1][0] and "eval: " not in outs[1][0]


@pytest.mark.slow
def test_eval_released_end_to_end_and_refusals(tmp_path):
    """script/eval_released.sh on a released-style checkpoint (plain state dict) for VOC's 20
    classes, with real VOC ids; nothing is written when an input is missing."""
    import numpy as np
    import torch
    from PIL import Image
    from network import build_network
    ids = (REPO / "metadata" / "voc12" / "train.txt").read_text().split()[:4]
    root = tmp_path / "VOC2012"
    rng = np.random.default_rng(0)
    for i in ids:
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClassAug").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 21, (40, 56), dtype=np.uint8), mode="L").save(
            root / "SegmentationClassAug" / f"{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(ids) + "\n")
    torch.manual_seed(0)
    torch.save(build_network("small_eps", 20).state_dict(), tmp_path / "checkpoint_cls.pth")
    env = dict(LIST=tmp_path / "list.txt", DEVICE="cpu", OUT_DIR=tmp_path / "out",
               INFER_ARGS="--scales 1.0 --num-workers 0 --writer-threads 1")
    run = lambda *a, **e: subprocess.run(["bash", str(SCRIPT / "eval_released.sh"), *map(str, a)],  # noqa: E731
                                         env={**{k: v for k, v in os.environ.items() if k not in SCRIPT_VARS},
                                              **TINY, **{k: str(v) for k, v in {**env, **e}.items()}},
                                         capture_output=True, text=True, timeout=120, cwd=REPO)
    proc = run(tmp_path / "missing.pth", root, "voc12")
    assert proc.returncode == 2 and "missing.pth" in proc.stderr and "README 'Downloads'" in proc.stderr
    assert not (tmp_path / "out").exists()
    out = ok(run(tmp_path / "checkpoint_cls.pth", root, "voc12"))
    row = [line for line in out.splitlines() if line.startswith("| voc12 |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["voc12", "small_eps", "list", "69.22"] and is_number(cells[4])


def test_outside_the_environment_one_line_says_how_to_activate(voc, tmp_path, hide_modules):
    """No venv activated: the script says once, in one line, how to activate or install the
    requirements; no traceback, no bash 'unbound variable'."""
    env = hide_modules("torch", "cv2", base={})
    proc = run_script("voc12_eps.sh", **voc, SAVE_ROOT=tmp_path, timeout=30,
                      PYTHONPATH=env["PYTHONPATH"], HIDDEN_MODULES=env["HIDDEN_MODULES"])
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "lacks torch opencv-python-headless of requirements.txt" in err[0], err
    assert "source .venv/bin/activate" in err[0] and "pip install -r" in err[0]
    proc = run_script("voc12_eps.sh", **voc, SAVE_ROOT=tmp_path, PYTHON="/nonexistent/python",
                      timeout=30)
    assert proc.returncode == 2 and "PYTHON=/nonexistent/python: no such interpreter" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr and "unbound variable" not in p.stderr
    assert not (tmp_path / "voc12_eps").exists()


def test_slurm_example_passes_the_cpus_to_srun(voc, tmp_path):
    """script/slurm_voc12_eps.sbatch under stand-in sbatch tools: its CHECK_ONLY step plans 2
    nodes x 4 GPUs without a problem, and srun gets --cpus-per-task explicitly (Slurm >= 22.05
    no longer passes sbatch's on), with SRUN_CPUS_PER_TASK exported too; the header says which
    Slurm versions it was written for."""
    text = (SCRIPT / "slurm_voc12_eps.sbatch").read_text()
    assert "Slurm 22.05 and newer" in text.split("#SBATCH")[0]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'node0\\nnode1\\n'\n")
    (fake / "srun").write_text('#!/bin/sh\necho "srun $* SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" '
                               f'> {tmp_path}/srun.txt\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update(TINY, **{k: str(v) for k, v in voc.items()})
    full.update(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2",
                SLURM_JOB_NODELIST="node[0-1]", SLURM_CPUS_PER_TASK="32", SAVE_ROOT=str(tmp_path),
                NETWORK="small_eps", BATCH="", SEG_BATCH="", SEG_ITER_SIZE="", NUM_WORKERS="")
    proc = subprocess.run(["bash", str(SCRIPT / "slurm_voc12_eps.sbatch")], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    out = ok(proc)
    plan = plan_of(out)
    assert plan["train"][1].startswith("classifier on 4 of 4 processes per node x 2 nodes: 8 = 1 x 8 x 1")
    assert plan["seg"][1].startswith("DeepLab on 1 of 4 processes per node x 2 nodes: 10 = 5 x 2 x 1")
    srun = (tmp_path / "srun.txt").read_text()
    assert "--cpus-per-task=32" in srun and "SRUN_CPUS_PER_TASK=32" in srun
    assert "NODE_RANK=$SLURM_NODEID bash script/voc12_eps.sh" in srun


def test_results_table_says_why_a_cell_is_empty(tmp_path):
    """An empty mIoU cell carries its reason: infer_seg.py's note (e.g. no ground truth), or
    that its stage did not run."""
    (tmp_path / "val_eval.skipped.txt").write_text("no score: the ground truth of val.txt is missing\n")
    cmd = (f"source {SCRIPT}/_common.sh; result_row DeepLab-v2 val 70.9 {tmp_path}/val_eval.txt; "
           f"result_row DeepLab-v2 val 70.9 {tmp_path}/other_eval.txt")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": sys.executable})
    rows = result_rows(ok(proc))
    assert proc.stdout.splitlines()[0] == ("| DeepLab-v2 | val | 70.9 | - (no score: the ground "
                                           "truth of val.txt is missing) |")
    assert proc.stdout.splitlines()[1].endswith("| - (not computed: its stage did not run) |")
    assert len(rows) == 1  # same label twice


@pytest.mark.slow
def test_a_retrained_checkpoint_never_leaves_old_outputs_counted_as_done(voc, tmp_path):
    """train.py --resume --extend writes new weights under the old name. The rerun does not skip
    inference and evaluation because their files exist: preflight stops, naming --overwrite,
    before any compute; with it, the pseudo-masks are recomputed and the stale score is replaced
    (its record says what it scored)."""
    import torch
    from network import build_network
    from network.weights import record_network
    env = dict(voc, SAVE_ROOT=tmp_path, NETWORK="small_cls")
    ok(run_script("voc12_cls.sh", **env))
    run = tmp_path / "voc12_cls"
    torch.manual_seed(5)
    model = build_network("small_cls", 5)  # the demo dataset's 5 classes
    ckpt = run / "checkpoint_cls.pth"
    torch.save(record_network(model.state_dict(), model), ckpt)  # what --extend leaves
    proc = run_script("voc12_cls.sh", **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "eval: outputs are stale" in proc.stdout and "checkpoint_cls.pth changed since" in proc.stdout
    assert "holds results made by another checkpoint_cls.pth" in proc.stderr
    assert "INFER_ARGS" in proc.stderr and "--overwrite" in proc.stderr
    assert proc.stderr.count("  - ") == 1, proc.stderr  # that one problem, nothing else
    assert "Traceback" not in proc.stderr
    before = json.loads((run / "result" / "train_miou.json").read_text())
    out = ok(run_script("voc12_cls.sh", **env, INFER_ARGS=TINY["INFER_ARGS"] + " --overwrite"))
    assert "skip eval" not in out
    after = json.loads((run / "result" / "train_miou.json").read_text())
    assert after["inputs"] != before["inputs"]
    out = ok(run_script("voc12_cls.sh", **env))  # now current: skipped
    assert "skip train:" in out and "skip eval:" in out
