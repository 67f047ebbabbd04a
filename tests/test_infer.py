"""infer.py on generated data with fixed-seed small networks: the fast path against a
straightforward per-view implementation written here, CLI outputs, resume, atomic writes,
distributed splitting and bad input."""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer
from data.datasets import DataError, InferDataset
from network.weights import WeightsError
from data.registry import get_dataset
import network.cpu.fuse
from network.inference import SpeedOptions, prepare_for_inference
from network.weights import record_network
from utils import dist
from utils.cli import run_cli
from utils.errors import UserError
from network import build_network
from network import cam as camlib
from utils.io import load_npz

C = 3
IDS = ["img_a", "img_b", "img_c", "img_d"]
LABELS = {"img_a": [0], "img_b": [1, 2], "img_c": [0, 2], "img_d": [2]}
SIZES = {"img_a": (40, 30), "img_b": (33, 47), "img_c": (48, 48), "img_d": (26, 37)}  # (W, H)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    for i in IDS:
        w, h = SIZES[i]
        # smooth random image: upsampled noise, so CAMs have structure
        small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
    (root / "labels.txt").write_text("0 background\n1 cat\n2 dog\n3 train\n")
    (root / "image_labels.txt").write_text("".join(f"{i} {' '.join(map(str, LABELS[i]))}\n" for i in IDS))
    (root / "train.txt").write_text("\n".join(IDS) + "\n")
    return root


def make_checkpoint(path: Path, name: str, num_classes: int = C, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_network(name, num_classes)
    # Non-trivial BN statistics so that eval-mode BN is not the identity.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # Mostly positive class weights: ReLU CAMs of a random net are otherwise often all zero.
    with torch.no_grad():
        model.fc8.weight.normal_(0.05, 0.1) if name.endswith("cls") else model.fc8.weight.normal_(0, 1.0)
    # Recorded as train.py records it (network/weights.py): a custom dataset's class count is the
    # user's own, so an unrecorded checkpoint would need --network.
    torch.save(record_network(model.state_dict(), model), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    root = make_dataset(tmp / "data")
    return dict(root=root, tmp=tmp,
                cls=make_checkpoint(tmp / "cls.pth", "small_cls"),
                eps=make_checkpoint(tmp / "eps.pth", "small_eps", seed=1))


def parse(*argv):
    parser = infer.get_args_parser()
    return parser.parse_args([str(a) for a in argv])


def run(env, weights, *extra):
    args = parse("--dataset", "custom", "--img_root", env["root"], "--weights", weights,
                 "--num-workers", 0, "--writer-threads", 1, *extra)
    infer.main(args)
    return args


def straightforward(model, img_pil, label, scales=(0.5, 1.0, 1.5, 2.0)):
    """The published loop, written independently: 8 views, batch 1, per-view upsample."""
    w, h = img_pil.size
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    total = torch.zeros(C, h, w)
    with torch.no_grad():
        for s in scales:
            im = img_pil.resize((round(w * s), round(h * s)), Image.BICUBIC)
            x = torch.from_numpy(((np.asarray(im) / 255.0 - mean) / std).astype(np.float32)).permute(2, 0, 1)
            for flip in (False, True):
                xi = torch.flip(x, [2]) if flip else x
                cam = model.forward_cam(xi[None])
                if model.head_type == "eps":
                    cam = F.softmax(cam, dim=1)
                cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=False)[0][:C]
                cam = cam * torch.tensor(label).view(C, 1, 1)
                total += torch.flip(cam, [2]) if flip else cam
    norm = total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)
    keys = [j for j in range(C) if label[j] > 1e-5]
    pred = torch.cat([torch.full((1, h, w), 0.2), norm], 0).argmax(0)   # all C+1 channels, as published
    return keys, norm[keys], pred.to(torch.uint8)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["cls", "eps"])
def test_fast_and_reference_paths_match_straightforward(env, head, monkeypatch):
    monkeypatch.setattr(network.cpu.fuse, "WINOGRAD_MIN_CHANNELS", 0)  # the small net's width is 16
    info = get_dataset("custom", env["root"])
    model = build_network(f"small_{head}", C)
    model.load_state_dict(torch.load(env[head], weights_only=True))
    model.eval()
    ds = InferDataset(info, env["root"], IDS)
    dev = torch.device("cpu")
    prep = lambda **kw: prepare_for_inference(model, dev, SpeedOptions(**kw))  # noqa: E731
    fused_model = prep(winograd=False)   # frozen graph (--no-winograd)
    wino_model = prep()                   # the CPU default
    assert "5 convs as Winograd" in wino_model.description
    for idx, img_id in enumerate(IDS):
        item = ds[idx]
        label = item["label"]
        pil = Image.open(env["root"] / "JPEGImages" / f"{img_id}.jpg").convert("RGB")
        keys_s, cams_s, pred_s = straightforward(model, pil, label.numpy())
        images, size = item["images"], item["size"]
        with torch.inference_mode():
            ref = infer.cams_reference(prep(fast=False), images, label, size)
            fast = infer.cams_fast(prep(fuse=False, batch_views=True), images, label, size)
            single = infer.cams_fast(prep(fuse=False, channels_last=False), images, label, size)
            fused = infer.cams_fast(fused_model, images, label, size)
            wino = infer.cams_fast(wino_model, images, label, size)
        for keys, cams, _ in (ref, fast, single, fused, wino):
            assert keys.tolist() == keys_s == LABELS[img_id]
            assert cams.shape == (len(keys_s), SIZES[img_id][1], SIZES[img_id][0])
            assert (cams - cams_s).abs().max() <= 1e-5
            assert torch.equal(camlib.pseudo_mask(keys, cams, thr=0.2), pred_s)
        assert (ref[2] is None) == (fast[2] is None) == (head == "cls")
        if head == "eps":
            assert (ref[2] - fast[2]).abs().max() <= 1e-5
            assert (ref[2] - fused[2]).abs().max() <= 1e-5
            assert (ref[2] - wino[2]).abs().max() <= 1e-5
        assert cams_s.amax(dim=(1, 2)).min() > 0.99  # normalised: every class peaks near 1


@pytest.mark.parametrize("head", ["cls", "eps"])
def test_cli_end_to_end_outputs(env, head, tmp_path):
    out = tmp_path / "out"
    run(env, env[head], "--cam_npy", out / "cam", "--cam_png", out / "png", "--vis-dir", out / "vis",
        "--vis-num", 2, "--save-bg", "--n_gpus", 2, "--n_processes_per_gpu", 1, 1,
        "--network", f"network.small_{head}", "--num-workers", 1)   # a DataLoader worker process
    for i in IDS:
        z = load_npz(out / "cam" / f"{i}.npz")
        assert z["keys"].dtype == np.int64 and z["keys"].tolist() == LABELS[i]
        w, h = SIZES[i]
        assert z["cams"].dtype == np.float32 and z["cams"].shape == (len(LABELS[i]), h, w)
        assert ("bg" in z) == (head == "eps")
        png = Image.open(out / "png" / f"{i}.png")
        assert png.mode == "P" and png.size == (w, h)
        mask = np.array(png)
        assert set(np.unique(mask)) <= {0} | {k + 1 for k in LABELS[i]}
        # the PNG is the npz thresholded at 0.20 (contract shared with evaluate.py)
        assert np.array_equal(mask, camlib.pseudo_mask(z["keys"], z["cams"], thr=0.2).numpy())
    assert sorted(p.name for p in (out / "vis").glob("*.png")) == ["img_a.png", "img_b.png"]
    assert Image.open(out / "vis" / "img_b.png").mode == "RGB"
    run_info = json.loads((out / "png" / "args.json").read_text())
    assert run_info["thr"] == 0.2
    # no temporary files left behind (each folder records its settings in SETTINGS_FILE)
    assert not [p for p in out.rglob(".*") if p.name != infer.SETTINGS_FILE]


def test_malloc_settings_only_when_infer_is_the_program(env, tmp_path, monkeypatch):
    # network/cpu/memory.keep_freed_memory lasts for the whole process: infer.py asks for it on
    # its default CPU path when it is the program, never when a caller runs main() in-process
    import network.cpu.memory as memory
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda *a: calls.append(a) or True)
    run(env, env["eps"], "--cam_png", tmp_path / "a")
    assert calls == []
    monkeypatch.setattr(infer, "OWN_PROCESS", True)
    run(env, env["eps"], "--cam_png", tmp_path / "b", "--no-winograd")
    assert calls == []  # the low-memory path leaves malloc alone
    run(env, env["eps"], "--cam_png", tmp_path / "c")
    assert len(calls) == 1


def test_no_fast_gives_identical_pngs(env, tmp_path, monkeypatch):
    a, b, c, e = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "e"
    monkeypatch.setattr(network.cpu.fuse, "WINOGRAD_MIN_CHANNELS", 0)  # the small net's width is 16
    calls = []
    real_fuse = network.cpu.fuse.fuse_for_inference
    monkeypatch.setattr(network.cpu.fuse, "fuse_for_inference",
                        lambda m, **kw: calls.append(kw) or real_fuse(m, **kw))
    run(env, env["eps"], "--png-dir", a / "png", "--cam-dir", a / "cam")   # default: fast + Winograd (CPU)
    assert calls == [{"winograd": True}]
    run(env, env["eps"], "--png-dir", b / "png", "--cam-dir", b / "cam", "--no-fast", "--no-channels-last")
    run(env, env["eps"], "--png-dir", c / "png", "--cam-dir", c / "cam", "--no-fuse")
    assert calls == [{"winograd": True}]
    run(env, env["eps"], "--png-dir", e / "png", "--cam-dir", e / "cam", "--no-winograd")
    assert calls == [{"winograd": True}, {"winograd": False}]
    for i in IDS:
        png = lambda d: np.array(Image.open(d / "png" / f"{i}.png"))
        cams = lambda d: load_npz(d / "cam" / f"{i}.npz")["cams"]
        for d in (a, c, e):
            assert np.array_equal(png(d), png(b))
            diff = np.abs(cams(d) - cams(b)).max()
            assert diff <= 1e-5


def test_threshold_and_bg_from_eps(env, tmp_path):
    lo, hi, bg = tmp_path / "lo", tmp_path / "hi", tmp_path / "bg"
    run(env, env["eps"], "--png-dir", lo, "--thr", 0.05)
    run(env, env["eps"], "--png-dir", hi, "--thr", 0.9)
    run(env, env["eps"], "--png-dir", bg / "png", "--cam-dir", bg / "cam", "--bg-from-eps")
    fg_lo = sum((np.array(Image.open(lo / f"{i}.png")) > 0).sum() for i in IDS)
    fg_hi = sum((np.array(Image.open(hi / f"{i}.png")) > 0).sum() for i in IDS)
    assert fg_lo > fg_hi
    for i in IDS:
        z = load_npz(bg / "cam" / f"{i}.npz")
        assert z["bg"].min() >= 0 and z["bg"].max() <= 1
        want = camlib.pseudo_mask(z["keys"], z["cams"], bg=z["bg"]).numpy()
        assert np.array_equal(np.array(Image.open(bg / "png" / f"{i}.png")), want)
    with pytest.raises(infer.InferError, match="background map"):
        run(env, env["cls"], "--png-dir", tmp_path / "x", "--bg-from-eps")


def test_resume_skips_complete_images_and_overwrite_recomputes(env, tmp_path):
    out = tmp_path / "out"
    flags = ("--png-dir", out / "png", "--cam-dir", out / "cam")
    run(env, env["cls"], *flags)
    stamp = {i: os.stat(out / "png" / f"{i}.png").st_mtime_ns for i in IDS}
    (out / "cam" / "img_c.npz").unlink()          # an interrupted run: one output missing
    os.utime(out / "png" / "img_a.png", ns=(1, 1))  # marker: must survive a resume untouched
    run(env, env["cls"], *flags)
    assert os.stat(out / "png" / "img_a.png").st_mtime_ns == 1
    assert (out / "cam" / "img_c.npz").is_file()
    assert os.stat(out / "png" / "img_b.png").st_mtime_ns == stamp["img_b"]
    # different result-affecting settings into the same folders: refused
    with pytest.raises(infer.InferError, match="other settings"):
        run(env, env["cls"], *flags, "--thr", 0.3)
    run(env, env["cls"], *flags, "--thr", 0.3, "--overwrite")
    assert os.stat(out / "png" / "img_a.png").st_mtime_ns != 1


def test_outputs_are_atomic(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = np.savez_compressed

    def crash_midway(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError("disk full (simulated)")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez_compressed", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        run(env, env["cls"], "--cam-dir", out / "cam", "--png-dir", out / "png")
    monkeypatch.setattr(np, "savez_compressed", real)
    names = sorted(p.name for p in (out / "cam").iterdir() if p.suffix == ".npz")
    assert "img_a.npz" in names and "img_b.npz" not in names   # the failed write left nothing
    assert not [p for p in (out / "cam").iterdir() if p.name.startswith(".") and p.name != infer.SETTINGS_FILE]
    run(env, env["cls"], "--cam-dir", out / "cam", "--png-dir", out / "png")   # resume completes
    assert len(list((out / "cam").glob("*.npz"))) == len(IDS)


def test_ranks_split_the_list_interleaved(env, tmp_path, monkeypatch):
    """Under torchrun (RANK / WORLD_SIZE; no process group) rank r takes ids[r::world]. On two
    nodes (LOCAL_WORLD_SIZE 1) rank 0 returns only when every rank's outputs exist: the
    evaluation that follows it on node 0 must not score a half-written folder written by another
    node. It waits at most --dist-timeout without a new file."""
    out = tmp_path / "out"
    seen = {}
    real_make = infer.make_cams

    def spy(model, items, *a, **k):
        seen[dist.launched_rank()] = list(items.dataset.ids)
        return real_make(model, items, *a, **k)

    monkeypatch.setattr(infer, "make_cams", spy)
    monkeypatch.setattr(dist, "wait_for_outputs", functools.partial(dist.wait_for_outputs,
                                                                    poll_s=0.01))
    # --device cpu: under a launcher, --device auto never falls back to the CPU (utils/device.py)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(infer.InferError, match="--overwrite cannot be used across several nodes"):
        run(env, env["cls"], "--device", "cpu", "--png-dir", out, "--overwrite")
    assert not out.exists()
    with pytest.raises(UserError, match=r"--dist-timeout.*2 still missing, e.g. img_b, img_d"):
        run(env, env["cls"], "--device", "cpu", "--png-dir", out, "--dist-timeout", "0.2")
    assert sorted(p.stem for p in out.glob("*.png")) == ["img_a", "img_c"]
    monkeypatch.setenv("RANK", "1")
    run(env, env["cls"], "--device", "cpu", "--png-dir", out)
    monkeypatch.setenv("RANK", "0")
    run(env, env["cls"], "--device", "cpu", "--png-dir", out, "--dist-timeout", "0.2")  # all there: returns
    assert seen == {0: ["img_a", "img_c"], 1: ["img_b", "img_d"]}
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(IDS)
    # one node (LOCAL_WORLD_SIZE = WORLD_SIZE): torchrun waits for every rank, rank 0 does not
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    run(env, env["cls"], "--device", "cpu", "--png-dir", tmp_path / "one_node", "--dist-timeout", "0.2")
    assert sorted(p.stem for p in (tmp_path / "one_node").glob("*.png")) == ["img_a", "img_c"]


def test_crf_outputs(env, tmp_path):
    out = tmp_path / "out"
    # One run covers the CLI, the spawned writer processes and the sub-folder naming; the
    # parameter presets themselves are tested in test_crf.py.
    run(env, env["eps"], "--crf", out / "crf", "--crf_alpha", 4, 32, "--crf_t", 3,
        "--crf-params", "deeplab")
    for a in ("a4_t3", "a32_t3"):
        for i in IDS:
            m = np.array(Image.open(out / "crf" / a / f"{i}.png"))
            assert m.shape == (SIZES[i][1], SIZES[i][0])
            assert set(np.unique(m)) <= {0} | {k + 1 for k in LABELS[i]}


# ------------------------------------------------------------------------------------------ bad input
def test_checkpoint_with_other_class_count_is_refused(env, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c5.pth", "small_cls", num_classes=5)
    with pytest.raises(WeightsError, match="small_cls checkpoint for 5 classes .*the dataset has 3"):
        run(env, ckpt, "--png-dir", tmp_path / "png")
    voc = make_checkpoint(tmp_path / "voc.pth", "small_eps", num_classes=20)
    with pytest.raises(WeightsError, match="small_eps checkpoint for 20 classes"):
        run(env, voc, "--png-dir", tmp_path / "png")
    with pytest.raises(WeightsError, match="is a small_cls checkpoint .*, not small_eps"):
        run(env, env["cls"], "--png-dir", tmp_path / "png", "--network", "small_eps")
    assert not (tmp_path / "png").exists()  # refused before any output folder was made


def test_unrecorded_checkpoint_on_a_custom_dataset_needs_network(env, tmp_path):
    # An EPS checkpoint for 2 classes (3 fc8 rows) also fits a cls head for the dataset's 3
    # classes: without train.py's record it is not run as either head silently.
    torch.manual_seed(0)
    model = build_network("small_eps", 2)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="pass --network"):
        run(env, tmp_path / "plain.pth", "--png-dir", tmp_path / "png")
    with pytest.raises(WeightsError, match="does not fit small_eps for 3 classes"):
        run(env, tmp_path / "plain.pth", "--png-dir", tmp_path / "png", "--network", "small_eps")
    run(env, tmp_path / "plain.pth", "--png-dir", tmp_path / "png", "--network", "small_cls")
    assert len(list((tmp_path / "png").glob("*.png"))) == len(IDS)


def test_missing_and_unreadable_images(env, tmp_path):
    root = make_dataset(tmp_path / "data")
    (root / "JPEGImages" / "img_b.jpg").unlink()
    e = dict(env, root=root)
    with pytest.raises(DataError, match="img_b"):
        run(e, env["cls"], "--png-dir", tmp_path / "png")
    run(e, env["cls"], "--png-dir", tmp_path / "png2", "--skip-missing")
    assert sorted(p.stem for p in (tmp_path / "png2").glob("*.png")) == ["img_a", "img_c", "img_d"]
    (root / "JPEGImages" / "img_b.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot read image"):
        run(e, env["cls"], "--png-dir", tmp_path / "png3")


def test_cli_returns_error_code_with_message(env, tmp_path, caplog):
    rc = run_cli(infer.get_args_parser, infer.main, argv=[
        "--dataset", "custom", "--img_root", str(env["root"]), "--weights",
        str(tmp_path / "nope.pth"), "--png-dir", str(tmp_path / "png"), "--num-workers", "0"])
    assert rc == 2 and "nope.pth" in caplog.text
    with pytest.raises(infer.InferError, match="nothing to write"):
        run(env, env["cls"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_share_the_output_folder(env, tmp_path):
    import subprocess
    import sys
    repo = Path(infer.__file__).resolve().parent
    out = tmp_path / "png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "infer.py"), "--dataset", "custom", "--img_root", str(env["root"]),
           "--weights", str(env["eps"]), "--png-dir", str(out), "--num-workers", "0",
           "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(IDS)
    assert "rank 0/2 has 2" in (out / "log.txt").read_text()
