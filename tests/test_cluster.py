"""GPU-cluster behaviour that a CPU can check (issue 19): the device under a launcher, write
errors at the output boundary, and other small pieces of the multi-GPU path."""
from __future__ import annotations

import pytest
import torch

from utils import device as devmod
from utils.device import DeviceError, resolve_device


def test_device_auto_under_a_launcher_never_falls_back_to_the_cpu(monkeypatch):
    """torchrun --nproc_per_node 2 train.py ... (--device auto) on a machine whose CUDA does not
    work: a one-line error naming --device cpu, not two CPU processes behind a warning."""
    monkeypatch.setattr(devmod, "cuda_problem", lambda: "no GPU is visible to this process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"--device auto under a launcher with 2 processes "
                                          r"needs CUDA: no GPU is visible.*pass --device cpu"):
        resolve_device("auto", 0)
    assert resolve_device("cpu", 0) == torch.device("cpu")  # the way to ask for the CPU
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: auto still means "CUDA if it works"
    assert resolve_device("auto", 0) == torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# a full disk, a quota, a read-only folder: one line naming the folder, nothing half-written
# ------------------------------------------------------------------------------------------------
class _FailingFile:
    """A file whose writes fail with ``err`` (what a full disk does to write(2))."""

    def __init__(self, err):
        self.err = err

    def write(self, data):
        raise OSError(self.err, __import__("os").strerror(self.err))

    def flush(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("err, words", [(28, "no space left on the device"),
                                        (122, "disk quota exceeded"),
                                        (30, "read-only")])
def test_write_errors_end_in_one_line_naming_the_folder(tmp_path, monkeypatch, err, words):
    from utils import io as io_mod
    from utils.io import OutputError, atomic_write_text, save_label_png, torch_save
    import numpy as np
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("complete")
    monkeypatch.setattr(io_mod, "open", lambda *a, **k: _FailingFile(err), raising=False)
    for write in (lambda: atomic_write_text(out / "old.txt", "new"),
                  lambda: torch_save({"w": torch.zeros(3)}, out / "checkpoint_last.pth"),
                  lambda: save_label_png(out / "a.png", np.zeros((4, 4), np.uint8))):
        with pytest.raises(OutputError) as e:
            write()
        msg = str(e.value)
        assert msg.startswith(f"{out}: cannot write ") and words in msg and "\n" not in msg
    # nothing half-written: the old file is intact, no temporary file is left
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "complete"


def test_jsonl_metrics_on_a_full_disk(tmp_path, monkeypatch):
    import builtins
    from utils.io import OutputError
    from utils.run import JsonlLogger
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: _FailingFile(28)
                        if str(p).endswith("metrics.jsonl") else real_open(p, *a, **k))
    with pytest.raises(OutputError, match=r"metrics\.jsonl: no space left"):
        log.log(iter=1, loss=0.5)


def test_a_real_full_file_system(tmp_path):
    """A 256 KiB tmpfs (needs root; skipped elsewhere): torch.save reports the full disk as
    'unexpected pos', which becomes the same one line; nothing is left behind."""
    import subprocess
    from utils.io import OutputError, torch_save
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(OutputError, match=r"small: cannot write big\.pth: no space left"):
            torch_save({"w": torch.zeros(1 << 20)}, mnt / "big.pth")  # 4 MB
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------------------
# infer_seg.py: the argmax on the device unless the CRF needs the probabilities
# ------------------------------------------------------------------------------------------------
class _Watched(torch.Tensor):
    """A tensor that records the shapes of what is copied to the host (.cpu() / .numpy())."""
    copies: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            cls.copies.append(tuple(args[0].shape))
        return super().__torch_function__(func, types, args, kwargs or {})


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=2, size=(24, 32)):
        g = torch.Generator().manual_seed(0)
        self.items = [(f"im{i}", None) for i in range(n)]
        self.data = [torch.randn(3, *size, generator=g) * 50 for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k][0], self.data[k], torch.zeros(*self.data[k].shape[1:], 3,
                                                           dtype=torch.uint8)


def test_seg_inference_copies_labels_not_probabilities(tmp_path, monkeypatch):
    """COCO: 81 x H x W float32 probabilities per image stay on the device; one uint8 label map
    crosses to the host, with the same labels as numpy's argmax of the probabilities."""
    import numpy as np
    from PIL import Image

    import infer_seg
    from network.deeplab import build_deeplab
    model = build_deeplab("deeplabv2_small", 81).eval()
    real = infer_seg.predict_probs
    seen = {}

    def watched(m, x, flip=False):
        p = real(m, x, flip)
        seen[len(seen)] = p[0].argmax(0).numpy().copy()
        return p.as_subclass(_Watched)
    monkeypatch.setattr(infer_seg, "predict_probs", watched)
    _Watched.copies = []
    infer_seg.run_inference(model, _Images(), tmp_path / "png", None, device=torch.device("cpu"))
    assert _Watched.copies and all(len(s) == 2 for s in _Watched.copies), _Watched.copies
    for k, name in enumerate(("im0", "im1")):
        assert (np.array(Image.open(tmp_path / "png" / f"{name}.png")) == seen[k]).all()


def test_to_labels_breaks_ties_like_numpy():
    import numpy as np
    from infer_seg import to_labels
    p = torch.zeros(5, 3, 4)
    p[1, 0, 0] = p[3, 0, 0] = 0.5  # a tie: the first maximum wins in both
    p[4, 2, 3] = 1.0
    assert (to_labels(p) == p.numpy().argmax(0).astype(np.uint8)).all()


# ------------------------------------------------------------------------------------------------
# missing validation ground truth: said before any compute, on the terminal, and in the table
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def seg_no_gt(tmp_path):
    """A 'custom' dataset without ground truth (3 classes) and a small DeepLab checkpoint."""
    from network.deeplab import build_deeplab
    from test_train import make_tiny_dataset
    root = make_tiny_dataset(tmp_path / "data", n=3)
    torch.manual_seed(0)
    torch.save(build_deeplab("deeplabv2_small", 4).state_dict(), tmp_path / "deeplab.pth")
    return root, tmp_path / "deeplab.pth"


def test_infer_seg_without_ground_truth_says_why_there_is_no_score(seg_no_gt, tmp_path, capsys):
    import argparse

    import infer_seg
    root, weights = seg_no_gt
    argv = ["--dataset", "custom", "--data_root", str(root), "--list", "train", "--weights",
            str(weights), "--out-dir", str(tmp_path / "val"), "--num-workers", "0",
            "--device", "cpu"]
    args = argparse.ArgumentParser(parents=[infer_seg.get_args_parser()]).parse_args(argv)
    result = infer_seg.main(args)
    out = capsys.readouterr().out
    assert result["miou"] is None and len(list((tmp_path / "val").glob("*.png"))) == 3
    assert "no score: the ground truth of train.txt is missing (e.g." in out
    assert "SegmentationClass" in out and "pass --gt_dir" in out
    note = tmp_path / "val_eval.skipped.txt"
    assert note.read_text().startswith("no score: the ground truth of train.txt is missing")


def test_preflight_names_missing_validation_ground_truth(seg_no_gt, tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from preflight import preflight
    root, weights = seg_no_gt
    argv = ["--dataset", "custom", "--data_root", str(root), "--list", "train",
            "--weights", str(weights), "--out-dir", str(tmp_path / "val")]
    stages = preflight([("segeval", "infer_seg.py", argv)], 1, {"*": 1}, "cpu")
    problems = [p for s in stages for p in s.problems]
    assert len(problems) == 1 and "ground truth of train not found" in problems[0], problems
    assert "--no-evaluate (SEGINFER_ARGS)" in problems[0]
    stages = preflight([("segeval", "infer_seg.py", argv + ["--no-evaluate"])], 1, {"*": 1}, "cpu")
    assert not [p for s in stages for p in s.problems]
