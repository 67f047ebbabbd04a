"""utils/io.py: atomic writes, their temporary names and the stale-temp cleaner, byte-reproducible
torch checkpoints, and the first-bytes description used by the weight readers' errors."""
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.io import (atomic_path, atomic_write_text, describe_file_start, is_temp_name,
                      remove_stale_temps, temp_name, torch_save)

REPO = Path(__file__).resolve().parent.parent


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# torch_save
# ------------------------------------------------------------------------------------------------
def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.running_mean": torch.zeros(4),
          "bn.num_batches_tracked": torch.tensor(0)}
    sd["tied"] = sd["conv.weight"]  # a shared storage is saved once
    return sd


def test_torch_save_gives_the_same_bytes_for_the_same_object(tmp_path):
    sd = sample_state_dict()
    paths = [tmp_path / "a" / "model.pth", tmp_path / "b" / "other_name.pth",
             tmp_path / "c" / "checkpoint_last"]
    for p in paths:
        torch_save(sd, p)
    digests = {sha256(p) for p in paths}
    assert len(digests) == 1
    # ... in another process as well (nothing depends on ids, hash seeds or the clock).
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from utils.io import torch_save; "
            "from tests.test_io import sample_state_dict; torch_save(sample_state_dict(), sys.argv[1])")
    other = tmp_path / "d" / "x.pth"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code, str(other), str(REPO)], check=True, env=env,
                   cwd=REPO, timeout=120)
    assert sha256(other) == digests.pop()
    # Safe loading and the published code's plain torch.load both read it.
    for loaded in (torch.load(paths[1], weights_only=True), torch.load(paths[1])):
        assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # No temporary file is left behind.
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["model.pth"]


# ------------------------------------------------------------------------------------------------
# temporary names and the cleaner
# ------------------------------------------------------------------------------------------------
def test_atomic_path_uses_the_shared_temp_name(tmp_path):
    target = tmp_path / "sub" / "checkpoint_last.pth"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".pth"
        assert is_temp_name(tmp.name) and tmp.name.startswith(".checkpoint_last.")
        assert tmp.exists() and (tmp.stat().st_mode & 0o777) == 0o600
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and not tmp.exists()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"x" and not tmp.exists()
    assert temp_name(target, "abcdefgh") == ".checkpoint_last.abcdefgh.tmp.pth"


def test_temp_name_pattern():
    for name in (".checkpoint_last.k3x9_a0q.tmp.pth", ".2007_000032.abcdefgh.tmp.png",
                 ".a.b.abcdefgh.tmp.npz", ".train_miou.abcdefgh.tmp.txt", ".noext.abcdefgh.tmp",
                 temp_name("x/.hidden", "a1b2c3d4"), temp_name("archive.tar.gz", "zzzzzzzz")):
        assert is_temp_name(name), name
    for name in (".bashrc", ".checkpoint_last.pth", ".x.ABCDEFGH.tmp.pth", ".x.abcdefg.tmp.pth",
                 ".x.abcdefghi.tmp.pth", "x.abcdefgh.tmp.pth", ".x.abcdefgh.tmp.pth.bak",
                 ".x.abcdefgh.tmp..pth", ".x.abcdefgh.temp.pth", ".cache", ".tmp"):
        assert not is_temp_name(name), name


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_remove_stale_temps_removes_only_its_own_temp_files(tmp_path, caplog):
    stale = [tmp_path / ".checkpoint_last.k3x9_a0q.tmp.pth", tmp_path / ".2007_000032.abcdefgh.tmp.png"]
    nested = tmp_path / "cams" / ".2007_000033.qwertyui.tmp.npz"
    keep = [tmp_path / ".bashrc", tmp_path / ".checkpoint_last.pth", tmp_path / "notes.tmp.txt",
            tmp_path / ".my.notes.tmp.txt", tmp_path / "checkpoint_last.pth"]
    fresh = tmp_path / ".checkpoint_final.abcdefgh.tmp.pth"  # a write that may still be running
    nested.parent.mkdir()
    for p in stale + keep + [nested, fresh]:
        p.write_bytes(b"partial")
        if p is not fresh:
            _age(p, 3600)
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # a folder with a matching name is not a temp file
    _age(tmp_path / ".dir.abcdefgh.tmp", 3600)
    link = tmp_path / ".link.abcdefgh.tmp.pth"
    link.symlink_to(tmp_path / "checkpoint_last.pth")

    with caplog.at_level("INFO", logger="utils.io"):
        removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert "removed 2 stale temporary file(s)" in caplog.text
    assert all(p.exists() for p in keep + [nested, fresh, link]) and (tmp_path / ".dir.abcdefgh.tmp").is_dir()
    assert not any(p.exists() for p in stale)

    assert remove_stale_temps(tmp_path, recursive=True) == [nested]
    assert remove_stale_temps(tmp_path, recursive=True, min_age_s=0) == [fresh]
    assert remove_stale_temps(tmp_path, recursive=True, min_age_s=0) == []
    assert remove_stale_temps(tmp_path / "missing") == []
    assert (tmp_path / "checkpoint_last.pth").read_bytes() == b"partial"


def test_temp_left_by_a_killed_writer_is_cleaned(tmp_path):
    """A writer killed with -9 inside atomic_path leaves its temporary file; the cleaner finds it."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from utils.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half a checkpoint'); os.kill(os.getpid(), 9)\n")
    target = tmp_path / "checkpoint_last.pth"
    r = subprocess.run([sys.executable, "-c", code, str(target), str(REPO)], timeout=60)
    assert r.returncode == -9 and not target.exists()
    (left,) = [p for p in tmp_path.iterdir()]
    assert is_temp_name(left.name)
    _age(left, 3600)
    assert remove_stale_temps(tmp_path) == [left] and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# describe_file_start
# ------------------------------------------------------------------------------------------------
def test_describe_file_start(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "z.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "l.pth", _use_new_zipfile_serialization=False)
    assert describe_file_start((tmp_path / "z.pth").read_bytes()[:64])[0] == "zip"
    assert describe_file_start((tmp_path / "l.pth").read_bytes()[:64])[0] == "torch-legacy"
    assert describe_file_start(b"") == ("empty", "nothing (0 bytes)")
    assert describe_file_start(b"hello\nworld") == ("text", "text 'hello\\nworld'")
    assert describe_file_start(b"  <!DOCTYPE html>")[1].startswith("an HTML page")
    assert describe_file_start("caf\u00e9".encode()[:4]) == ("text", "text 'caf'")  # cut character
    assert describe_file_start(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09") == \
        ("binary", "bytes 00 01 02 03 04 05 06 07 ...")
    assert describe_file_start(b"\x80\x04\x95abc")[0] == "pickle"
    assert describe_file_start((0x112).to_bytes(8, "little") + bytes(8))[0] == "mxnet"
    for head in (b"\x00" * 64, bytes(range(256))[:64], b"text\x00with nul"):
        kind, words = describe_file_start(head)
        assert "\n" not in words and words.isprintable()


def test_atomic_write_text_permissions_follow_umask(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_console_log_follows_current_stderr(monkeypatch):
    """setup_logging's console handler writes to sys.stderr as it is at each record: a handler
    made under one stream (a test's capture, a notebook cell) and used after that stream closed
    neither fails nor prints '--- Logging error ---'."""
    import io
    import logging
    import sys

    from utils.run import setup_logging

    root = logging.getLogger()
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    logging.getLogger("eps.test").warning("to the first stream")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("eps.test").warning("to the second stream")
    assert "to the second stream" in second.getvalue()
    assert "Logging error" not in second.getvalue()
    assert sum(getattr(h, "_eps_console", False) for h in root.handlers) == 1


def test_check_writable_tries_a_file_where_permissions_cannot_tell(tmp_path):
    """os.access says yes to root everywhere; /proc takes no new files even from root. The check
    creates one empty file to be sure, and leaves nothing behind where it succeeds."""
    import pytest

    from utils.run import RunDirError, check_writable

    with pytest.raises(RunDirError, match=r"^--out /proc/eps_out/x: .*(cannot create files in "
                                          r"/proc .*|/proc is not writable); choose another --out"):
        check_writable("/proc/eps_out/x", "--out")
    check_writable(tmp_path / "new" / "folder", "--out")
    assert list(tmp_path.iterdir()) == []
