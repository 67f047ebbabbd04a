"""What only a GPU can check: AMP training steps, NCCL collectives and DDP, the CUDA inference
path against the CPU reference, pinned-memory loading, TF32 flags, and checkpoints that move
between devices.

Every test is marked ``cuda`` and skipped (with the reason) where CUDA cannot be used: the
development and CI machines have no GPU. ``script/gpu_check.sh`` runs them on the day one is
available (docs/gpu.md). The tests write only under pytest's tmp_path and use small generated
data, so the whole module takes well under a minute on a GPU.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import infer
from data.datasets import ClsSalDataset, InferDataset
from data.registry import get_dataset
from data.transforms import INFER_SCALES, multiscale_arrays
from network import build_network
from network.inference import SpeedOptions, prepare_for_inference
from test_train import base_argv, final_state, make_tiny_dataset, run_main
from tools.benchmarks.infer import synthetic_image
from network import cam as camlib
from utils.device import DeviceError, configure_numerics, pin_memory
from utils.sampler import seeded_loader

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # one name for the device under test


def cuda() -> torch.device:
    return torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("cuda") / "data", n=12)


@pytest.fixture(autouse=True)
def _strict_fp32():
    """Each test starts from the entry points' numerics (TF32 off) and leaves them so."""
    configure_numerics(cuda())
    yield
    configure_numerics(cuda())


def metrics(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def child_env() -> dict:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------
# training steps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_train_step_with_amp(data_root, tmp_path, amp):
    """train.py on the GPU with autocast: finite losses, the GradScaler only for fp16, the
    numerics recorded in env.json, a final checkpoint in the published layout."""
    if amp == "bf16" and torch.cuda.get_device_capability(cuda())[0] < 8:
        with pytest.raises(DeviceError, match="no native bfloat16"):
            run_main(base_argv(data_root, tmp_path, session=amp, iters=3, amp=amp, device=DEVICE))
        return
    run_dir = run_main(base_argv(data_root, tmp_path, session=amp, iters=3, amp=amp,
                                 device=DEVICE))
    recs = metrics(run_dir)
    assert [r["iter"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert np.isfinite([r["loss"], r["loss_cls"], r["loss_sal"]]).all(), r
        assert r["mem_mb"] > 0  # torch.cuda.max_memory_allocated: the GPU did the work
    env = json.loads((run_dir / "env.json").read_text())
    assert env["numerics"]["amp"] == amp and env["numerics"]["device"].startswith("cuda")
    assert env["numerics"]["tf32"] is False and env["numerics"]["gpu"]
    last = torch.load(run_dir / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert bool(last["scaler"]) == (amp == "fp16")  # the loss scaler is fp16's alone
    sd = final_state(run_dir)
    assert all(v.device.type == "cpu" for v in sd.values())
    build_network("small_eps", 3).load_state_dict(sd)


def test_checkpoint_saved_on_gpu_resumes_on_cpu(data_root, tmp_path):
    """A run stopped on the GPU continues on the CPU (checkpoints are read with
    map_location='cpu'), and the GPU-trained weights make pseudo-masks with infer.py on the
    CPU."""
    argv = base_argv(data_root, tmp_path, session="moved", iters=4, device=DEVICE)
    run_main(argv + ["--stop-after", "2"])
    ckpt = torch.load(tmp_path / "moved" / "checkpoint_last.pth", map_location="cpu",
                      weights_only=True)
    assert ckpt["iter"] == 2 and ckpt["rng"][0]["cuda"]  # the GPU's RNG state was saved too
    run_dir = run_main(base_argv(data_root, tmp_path, session="moved", iters=4, device="cpu")
                       + ["--resume"])
    recs = metrics(run_dir)
    assert [r["iter"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in recs)
    args = infer.get_args_parser().parse_args([
        "--dataset", "custom", "--img_root", str(data_root), "--infer_list", "train",
        "--weights", str(run_dir / "checkpoint_cls.pth"), "--png-dir", str(tmp_path / "png"),
        "--scales", "1.0", "--num-workers", "0", "--writer-threads", "1", "--device", "cpu"])
    infer.main(args)
    assert len(list((tmp_path / "png").glob("*.png"))) == 12


# ---------------------------------------------------------------------------------------------
# NCCL and DDP
# ---------------------------------------------------------------------------------------------
needs_two_gpus = pytest.mark.skipif(
    DEVICE == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2),
    reason="needs 2 GPUs")

COLLECTIVES = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    from utils import dist
    from utils.device import resolve_device

    device = resolve_device({device!r}, dist.get_local_rank())
    dist.init_distributed(device, 120)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and dist.collective_device().type == device.type
    # A CPU tensor: NCCL accepts only CUDA tensors; utils.dist moves it there and back.
    total = dist.all_reduce_sum(torch.tensor([rank + 1.0]))
    assert total.device.type == "cpu" and total.item() == 3.0, total
    mean = dist.all_reduce_mean(torch.full((1000,), float(rank), device=device))
    assert mean.device == device and torch.all(mean == 0.5), mean[:4]
    assert dist.all_gather_object({{"rank": rank}}) == [{{"rank": 0}}, {{"rank": 1}}]
    assert dist.broadcast_object("from 0" if rank == 0 else None) == "from 0"
    dist.barrier()
    print("collectives ok on rank", rank, flush=True)
    dist.cleanup()
""")


@needs_two_gpus
def test_nccl_collectives_through_utils_dist(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES.format(repo=str(REPO), device=DEVICE))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script)], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("collectives ok") == 2


@needs_two_gpus
def test_ddp_on_two_gpus_matches_one_gpu(data_root, tmp_path):
    """tests/test_train_ddp.py on NCCL: with frozen BN, 2 GPUs x batch 2 give the losses and
    weights of 1 GPU x batch 4 (up to float reduction order)."""
    argv = lambda s: base_argv(data_root, tmp_path / "runs", session=s, iters=3, freeze_bn=True,  # noqa: E731
                               device=DEVICE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(REPO / "train.py")] + argv("ddp"),
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ddp_dir = tmp_path / "runs" / "ddp"
    log = (ddp_dir / "log.txt").read_text()
    assert "2 process(es)" in log and "weights identical on all 2 ranks" in log
    single_dir = run_main(argv("single"))
    for a, b in zip(metrics(ddp_dir), metrics(single_dir)):
        for key in ("loss", "loss_cls", "loss_sal"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["iter"], key)
    sd, ss = final_state(ddp_dir), final_state(single_dir)
    for k in ss:
        torch.testing.assert_close(sd[k], ss[k], rtol=1e-3, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def trained_looking(name: str, seed: int = 0) -> torch.nn.Module:
    """A network with fixed-seed random weights made to behave like a trained one: BN statistics
    that are not the identity, and class maps with structure (as in tools/benchmarks/infer.py).
    On the test image the ResNet-38 masks hold background and a class (cls; the other present
    class has an all-zero ReLU CAM) or both present classes (eps)."""
    torch.manual_seed(seed)
    model = build_network(name, 20).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    with torch.inference_mode():
        raw = model.forward_cam(torch.randn(1, 3, 64, 64))
    with torch.no_grad():  # class maps with a spread of about 2: masks that are not flat
        model.fc8.weight.mul_(2.0 / float(raw.std()))
    return model


def near_ties(cams, thr: float, where: torch.Tensor, gap: float) -> bool:
    """Whether every pixel in ``where`` has its two best scores ([thr; cams]) within ``gap``:
    the only pixels where a rounding difference may flip the argmax of the pseudo-mask."""
    scores = torch.cat([torch.full_like(cams[:1], thr), cams]).float()
    top2 = scores.topk(2, dim=0).values
    return bool(((top2[0] - top2[1])[where] < gap).all())


# CPU and GPU fp32 differ in summation order and convolution algorithms (cuDNN picks its own):
# about 1e-6 relative per layer; after ResNet-38's 38 layers and the max-normalisation the
# CAMs agree to ~1e-5. The CPU fast paths agree with the reference to 1e-5 (docs/inference.md).
CAM_TOL = 2e-4


@pytest.mark.parametrize("name", ["resnet38_eps", "resnet38_cls", "small_eps"])
def test_cuda_fast_path_matches_the_cpu_reference(name):
    """infer.py's CUDA path (channels_last, image and flip batched; strict fp32) computes the
    published CPU loop's CAMs: within CAM_TOL, and masks that differ only at near-ties."""
    model = trained_looking(name)
    pil = synthetic_image(160, 120)
    images = [torch.from_numpy(a) for a in multiscale_arrays(pil, INFER_SCALES)]
    label = torch.zeros(20)
    label[[6, 14]] = 1
    size = (120, 160)
    with torch.inference_mode():
        ref = infer.cams_reference(prepare_for_inference(
            copy.deepcopy(model), torch.device("cpu"), SpeedOptions(fast=False)), images, label, size)
        gpu = prepare_for_inference(copy.deepcopy(model), cuda(), SpeedOptions())
        assert gpu.batch_views and gpu.fast
        fast = infer.cams_fast(gpu, images, label, size)
    keys, cams, bg = (t.cpu() if t is not None else None for t in fast)
    assert torch.equal(keys, ref[0])
    diff = (cams - ref[1]).abs().max().item()
    assert diff <= CAM_TOL, f"max |dCAM| {diff:.2e}"
    if ref[2] is not None:
        assert (bg - ref[2]).abs().max().item() <= CAM_TOL
    # Scores that each moved by at most diff can swap order only where they were within 2 diff.
    mask, ref_mask = (camlib.pseudo_mask(keys, c, thr=camlib.DEFAULT_THR) for c in (cams, ref[1]))
    assert near_ties(ref[1], camlib.DEFAULT_THR, mask != ref_mask, gap=2 * diff + 1e-7)


def test_cuda_fp16_autocast_stays_close():
    """--amp (float16 autocast) changes the CAMs slightly, as documented; they stay finite and
    the masks agree on at least 99% of the pixels."""
    model = trained_looking("resnet38_eps")
    images = [torch.from_numpy(a) for a in multiscale_arrays(synthetic_image(160, 120), INFER_SCALES)]
    label = torch.zeros(20)
    label[[6, 14]] = 1
    with torch.inference_mode():
        strict = infer.cams_fast(prepare_for_inference(copy.deepcopy(model), cuda(), SpeedOptions()),
                                 images, label, (120, 160))
        half = infer.cams_fast(prepare_for_inference(copy.deepcopy(model), cuda(),
                                                     SpeedOptions(amp=True)), images, label, (120, 160))
    assert torch.isfinite(half[1]).all()
    masks = [camlib.pseudo_mask(r[0], r[1], thr=camlib.DEFAULT_THR) for r in (strict, half)]
    assert (masks[0] == masks[1]).float().mean().item() >= 0.99


# ---------------------------------------------------------------------------------------------
# loading and numerics
# ---------------------------------------------------------------------------------------------
def test_pinned_memory_loading(data_root):
    """train.py and infer.py pin host memory exactly when the device is a GPU; pinned batches
    from worker processes copy to the GPU asynchronously and unchanged."""
    assert pin_memory(cuda()) is True and pin_memory(torch.device("cpu")) is False
    info = get_dataset("custom", data_root, data_root)
    train_set = ClsSalDataset(info, data_root, data_root / "SALImages", "train", crop_size=32,
                              resize_size=(32, 48))
    loader = seeded_loader(train_set, global_batch=4, seed=0, start_batch=0, rank=0,
                           world_size=1, num_workers=2, pin_memory=pin_memory(cuda()))
    _, img, sal, label = next(iter(loader))
    for t in (img, sal, label):
        assert t.is_pinned()
    on_gpu = img.to(cuda(), non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), img)
    infer_set = InferDataset(info, data_root, info.read_ids("train")[:2])
    items = torch.utils.data.DataLoader(infer_set, batch_size=None, num_workers=1,
                                        pin_memory=True, collate_fn=infer._identity)
    item = next(iter(items))
    assert all(t.is_pinned() for t in item["images"])


def test_configure_numerics_sets_tf32_and_cudnn_flags():
    """torch >= 2.x allows TF32 in cuDNN convolutions by default; the entry points turn it off
    unless --tf32 (the published runs predate TF32), and record what is in effect."""
    dev = cuda()
    torch.backends.cudnn.allow_tf32 = True  # torch's own default
    info = configure_numerics(dev)
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.benchmark is False
    assert info["tf32"] is False and info["device"].startswith("cuda")
    assert info["gpu"] == torch.cuda.get_device_name(dev) and info["cuda"] == torch.version.cuda
    assert info["cudnn"] == torch.backends.cudnn.version()
    info = configure_numerics(dev, tf32=True, cudnn_benchmark=True)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark
    assert info["tf32"] is True and info["cudnn_benchmark"] is True
    if torch.cuda.get_device_capability(dev)[0] >= 8:
        assert configure_numerics(dev, amp="bf16")["amp"] == "bf16"
    else:
        with pytest.raises(DeviceError, match="no native bfloat16"):
            configure_numerics(dev, amp="bf16")
