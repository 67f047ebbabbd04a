"""tools/preflight.py as a library: each stage's inputs are named when missing, before compute.

The pipeline scripts' use of it (whole plans, refused process counts) is in test_scripts.py."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from preflight import preflight  # noqa: E402
from test_train import make_tiny_dataset  # noqa: E402


def _problems(groups, procs=None):
    stages = preflight(groups, nodes=1, procs=procs or {"*": 1}, device="cpu")
    return [p for s in stages for p in s.problems]


def test_seg_inference_weights_given_as_a_run_directory(tmp_path):
    """--weights may be train_seg.py's run directory: preflight looks for its
    checkpoint_final.pth there (and names that file when it is missing)."""
    root = make_tiny_dataset(tmp_path / "data", n=4)
    run_dir = tmp_path / "deeplab"
    run_dir.mkdir()
    argv = ["--dataset", "custom", "--data_root", str(root), "--list", "train",
            "--weights", str(run_dir), "--out-dir", str(tmp_path / "out"), "--no-evaluate"]
    problems = _problems([("segeval", "infer_seg.py", argv)])
    assert len(problems) == 1 and str(run_dir / "checkpoint_final.pth") in problems[0], problems
    (run_dir / "checkpoint_final.pth").write_bytes(b"")  # present, but preflight reads it
    problems = _problems([("segeval", "infer_seg.py", argv)])
    assert len(problems) == 1 and "empty (0 bytes)" in problems[0], problems
    import torch
    from network.deeplab import build_deeplab
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(), run_dir / "checkpoint_final.pth")
    assert _problems([("segeval", "infer_seg.py", argv)]) == []


def test_an_earlier_stage_that_makes_an_input_satisfies_it(tmp_path):
    """The seg stage's checkpoint is made by the stage before it in the same plan: not missing."""
    root = make_tiny_dataset(tmp_path / "data", n=4)
    masks = tmp_path / "masks"
    masks.mkdir()
    seg = ["--dataset", "custom", "--data_root", str(root), "--train-list", "train",
           "--mask-dir", str(masks), "--init", "none", "--run-dir", str(tmp_path / "deeplab"),
           "--batch-size", "2", "--max-iters", "2"]
    segeval = ["--dataset", "custom", "--data_root", str(root), "--list", "train",
               "--weights", str(tmp_path / "deeplab"), "--out-dir", str(tmp_path / "out"),
               "--no-evaluate"]
    assert _problems([("seg", "train_seg.py", seg), ("segeval", "infer_seg.py", segeval)]) == []


# ------------------------------------------------------------------------------------------------
# weights files are read (headers, keys, shapes), not only looked up; numeric modes are checked
# ------------------------------------------------------------------------------------------------
def _seg_stage(root, tmp_path, init, *extra):
    masks = tmp_path / "masks"
    masks.mkdir(exist_ok=True)
    return ("seg", "train_seg.py", ["--dataset", "custom", "--data_root", str(root),
                                    "--train-list", "train", "--mask-dir", str(masks),
                                    "--init", str(init), "--arch", "deeplabv2_small",
                                    "--run-dir", str(tmp_path / "deeplab"), *extra])


def test_unusable_weights_files_are_named_before_any_compute(tmp_path):
    """An unconverted .caffemodel, a text file, a checkpoint of another network as SEG_INIT, and
    a corrupt WEIGHTS file: each one line, from reading the files, before any stage runs."""
    import torch
    from network import build_network
    root = make_tiny_dataset(tmp_path / "data", n=4)
    caffe = tmp_path / "init.caffemodel"
    caffe.write_bytes(b"\n\x0cDeepLab-COCO\x12\x00" + bytes(64))
    proto = tmp_path / "init.pth"  # the same bytes under a .pth name: found by its start
    proto.write_bytes(caffe.read_bytes())
    text = tmp_path / "init.txt"
    text.write_text("404 Not Found\n")
    other = tmp_path / "classifier.pth"
    torch.save(build_network("small_eps", 3).state_dict(), other)
    for init, expect in ((caffe, "a Caffe .caffemodel, not a PyTorch file; convert it"),
                         (proto, "a Caffe .caffemodel"),
                         (text, "not a PyTorch weights file (it starts with text"),
                         (other, "neither deeplab-pytorch keys")):
        problems = _problems([_seg_stage(root, tmp_path, init)])
        assert len(problems) == 1 and expect in problems[0] and str(init) in problems[0], problems
    assert f"python -m network.caffemodel {caffe} deeplabv1_resnet101-coco.pth" in \
        _problems([_seg_stage(root, tmp_path, caffe)])[0]
    corrupt = tmp_path / "w.pth"
    torch.save(build_network("small_eps", 3).state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:3000])
    train = ["--dataset", "custom", "--data_root", str(root), "--network", "small_eps",
             "--weights", str(corrupt), "--save_root", str(tmp_path / "runs"),
             "--train_list", "train", "--crop_size", "32", "--resize_size", "32", "48",
             "--batch_size", "4", "--max_iters", "2", "--tau", "0.4", "--lam", "0.5",
             "--lr", "0.01"]
    problems = _problems([("train", "train.py", train)])
    assert len(problems) == 1 and "corrupt or truncated PyTorch file" in problems[0], problems


def test_a_fully_supervised_deeplab_init_is_refused(tmp_path):
    """A DeepLab whose ASPP has the target's class count (deeplab-pytorch's
    deeplabv2_resnet101_msc-vocaug-20000.pth for VOC) as --init: refused, in preflight and in
    train_seg.py, unless --allow-supervised-init; a COCO-like init (91 outputs) is accepted."""
    import torch
    from network.deeplab import SegWeightsError, build_deeplab, load_init_weights
    root = make_tiny_dataset(tmp_path / "data", n=4)  # 3 classes + background = 4 outputs
    voc_like = tmp_path / "deeplabv2_msc-vocaug-20000.pth"
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(), voc_like)
    coco_like = tmp_path / "coco.pth"
    sd = {k[len("base."):]: v for k, v in build_deeplab("deeplabv2_small", 4).state_dict().items()
          if not k.startswith("base.aspp.")}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(91, 256, 1, 1), torch.zeros(91)
    torch.save(sd, coco_like)
    problems = _problems([_seg_stage(root, tmp_path, voc_like)])
    assert len(problems) == 1, problems
    assert "base.aspp.c0.weight has 4 outputs, the 4 classes of this dataset" in problems[0]
    assert "--allow-supervised-init" in problems[0] and "inflates the val mIoU" in problems[0]
    assert _problems([_seg_stage(root, tmp_path, voc_like, "--allow-supervised-init")]) == []
    assert _problems([_seg_stage(root, tmp_path, coco_like)]) == []
    with pytest.raises(SegWeightsError, match="--allow-supervised-init"):
        load_init_weights(build_deeplab("deeplabv2_small", 4), voc_like)
    load_init_weights(build_deeplab("deeplabv2_small", 4), voc_like, allow_supervised=True)


def test_bf16_on_a_gpu_without_native_bf16_is_named_up_front(tmp_path, monkeypatch):
    """--amp bf16 with DEVICE=cuda on a pre-Ampere GPU: a preflight problem (it used to fail
    only when the stage started, after hours of earlier stages). No GPU here: the device
    queries are stood in for, the check itself is the real one (utils/device.py)."""
    import torch

    import preflight as pf
    from utils import device as devmod
    monkeypatch.setattr(devmod, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(devmod, "_native_bf16", lambda d: False)
    root = make_tiny_dataset(tmp_path / "data", n=4)
    stage = _seg_stage(root, tmp_path, "none", "--amp", "bf16")
    problems = [p for s in pf.preflight([stage], 1, {"*": 2}, "cuda") for p in s.problems]
    assert problems == ["GPU 0: --amp bf16: Tesla V100-SXM2-32GB has no native bfloat16 (it "
                        "needs compute capability 8.0, Ampere, or newer) and would run it "
                        "emulated; use --amp fp16 or --amp off"], problems
    stage = _seg_stage(root, tmp_path, "none", "--amp", "fp16")
    assert [p for s in pf.preflight([stage], 1, {"*": 1}, "cpu") for p in s.problems] == [
        "--amp fp16 needs a CUDA device; use --amp bf16 on the CPU, or --amp off"]
