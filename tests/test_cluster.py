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
