"""Atomic file output: every writer goes through a temporary file in the target folder and an
``os.replace``, so a crash or kill never leaves a half-written PNG, npz or checkpoint behind, and
a resumed job can trust that an existing output file is complete. A kill -9 can leave the hidden
temporary file itself; :func:`remove_stale_temps` removes those (and nothing else).

A write that fails for a reason the user can fix (a full disk or quota, a read-only or
unwritable folder) ends in one line naming the folder and the problem (:class:`OutputError`,
see :func:`write_errors`), never a traceback hours into a run; the temporary file goes, the
previous complete file (if any) stays."""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image

from utils.errors import UserError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

logger = logging.getLogger(__name__)

# Temporary names: ".<stem>.<token>.tmp<suffix>" next to the target, e.g.
# ".checkpoint_last.k3x9_a0q.tmp.pth". The suffix is kept so libraries that dispatch on it still
# work; the leading dot hides the file. The token uses the alphabet and length of tempfile.mkstemp,
# which made these names before, so remove_stale_temps also recognises files left by older runs.
TEMP_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
TEMP_TOKEN_LEN = 8
TEMP_MARK = ".tmp"
TEMP_NAME_RE = re.compile(r"\.(?P<stem>.*)\.[" + re.escape(TEMP_TOKEN_ALPHABET) + r"]{"
                          + str(TEMP_TOKEN_LEN) + r"}" + re.escape(TEMP_MARK) + r"(?P<suffix>\.[^.]+)?")
# A temporary file younger than this may belong to a writer that is still running (another
# process writing into the same folder), so the cleaner leaves it alone. Live writes refresh the
# file's mtime as they go; ten minutes without a write is an interrupted one.
STALE_AFTER_S = 600.0


class OutputError(UserError):
    """An output could not be written (full disk, quota, read-only or unwritable folder)."""


# errno -> what the user reads; anything else stays a bug with its traceback.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device: free some space (or choose a folder on another "
                  "disk) and rerun; finished outputs are kept",
    errno.EDQUOT: "disk quota exceeded: free some space within your quota (or choose another "
                  "folder) and rerun; finished outputs are kept",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the folder's permissions or choose another folder",
    errno.EPERM: "operation not permitted: fix the folder's permissions or choose another folder",
    errno.EFBIG: "file too large for this file system: choose a folder on another disk",
}
LOW_SPACE_BYTES = 1 << 20  # below this, a failed write is taken for a full disk


def _problem(e: OSError) -> str:
    """What the user reads for ``e``: the fix for the errors of WRITE_ERRNOS, and the error."""
    text = f"[Errno {e.errno}] {os.strerror(e.errno)}" if e.errno else str(e)
    return f"{WRITE_ERRNOS[e.errno]} ({text})" if e.errno in WRITE_ERRNOS else text


@contextlib.contextmanager
def write_errors(folder, what: str) -> Iterator[None]:
    """Turn a write error the user can fix into one :class:`OutputError` line naming ``folder``
    (e.g. "runs/voc12_eps: cannot write checkpoint_last.pth: no space left on the device ...")."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(f"{folder}: cannot write {what}: {_problem(e)}") from None


@contextlib.contextmanager
def file_system_errors() -> Iterator[None]:
    """For a tool whose every step is file work on the user's folders (tools/download.py):
    any OSError on a named path (permission denied on an existing sub-folder, a file where a
    folder belongs, a full disk ...) becomes one :class:`OutputError` line naming the path and
    the problem, with the fix where :data:`WRITE_ERRNOS` knows one (e.g. "datasets/VOCdevkit:
    permission denied: fix the folder's permissions ... ([Errno 13] Permission denied)"). An
    OSError that names no path is not the file system's: it keeps its traceback."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise
        path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        problem = _problem(e)
        if e.errno in (errno.EEXIST, errno.ENOTDIR) and not os.path.isdir(e.filename):
            problem = f"a file stands where a folder belongs: move it away and rerun ({problem})"
        raise OutputError(f"{path}: {problem}") from None


def disk_full(folder) -> bool:
    """Whether ``folder``'s file system has (almost) no room left, for writers whose library
    hides the OSError (torch.save reports a full disk as 'unexpected pos')."""
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def temp_name(path, token: str) -> str:
    """The temporary file name atomic_path uses for ``path`` (a name, without the folder)."""
    path = Path(path)
    return f".{path.stem}.{token}{TEMP_MARK}{path.suffix}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one that atomic_path creates (see temp_name)."""
    return TEMP_NAME_RE.fullmatch(name) is not None


def _create_temp(path: Path) -> Path:
    """Create an empty, private (0600) temporary file next to ``path``; never reuses a name."""
    for _ in range(100):
        token = "".join(secrets.choice(TEMP_TOKEN_ALPHABET) for _ in range(TEMP_TOKEN_LEN))
        tmp = path.parent / temp_name(path, token)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` only if the block
    succeeds. The temporary name keeps the suffix so libraries that dispatch on it still work."""
    path = Path(path)
    with write_errors(path.parent, path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
    try:
        with write_errors(path.parent, path.name):
            yield tmp
            # The temporary file is created 0600; give the result the permissions a plain open()
            # would.
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temps(folder, recursive: bool = False, *,
                       min_age_s: float = STALE_AFTER_S) -> List[Path]:
    """Remove the temporary files that atomic_path left in ``folder`` (and, if recursive, below
    it) when a run was killed before it could rename or delete them. Only names of atomic_path's
    pattern (see temp_name) that are regular files not modified for ``min_age_s`` seconds are
    removed: a user's own dotfiles, links and writes still in progress stay. Returns the removed
    paths; a missing folder removes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed: List[Path] = []
    walk = os.walk(folder) if recursive else [(str(folder), None, None)]
    for dirpath, _, _ in walk:
        try:
            entries = list(os.scandir(dirpath))
        except OSError:  # a folder we may not list is none of ours
            continue
        for entry in entries:
            if not is_temp_name(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # removed meanwhile (e.g. by its own writer)
                continue
            removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d stale temporary file(s) left by an interrupted run under %s "
                    "(e.g. %s)", len(removed), folder, removed[0].name)
    return removed


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


# VOC colour map (bit-interleaved, as in the VOC devkit) for palette PNGs.
def voc_palette(n: int = 256) -> np.ndarray:
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def save_label_png(path, mask: np.ndarray, palette: bool = True) -> None:
    """Write a uint8 label map as PNG (palette mode with VOC colours by default; the pixel values
    are the class indices either way, so readers that use np.array(Image.open(p)) see 0..C)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError("label values must be in 0..255")
        mask = mask.astype(np.uint8)
    mask = np.ascontiguousarray(mask)
    img = Image.frombytes("P" if palette else "L", (mask.shape[1], mask.shape[0]), mask.tobytes())
    if palette:
        img.putpalette(voc_palette().flatten().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path, **arrays) -> None:
    """np.savez_compressed through a temporary file (no pickle: only plain arrays)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_npz(path) -> dict:
    """Read an npz written by save_npz; pickled object arrays are refused."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def torch_save(obj, path) -> None:
    """torch.save through a temporary file; the same object always gives the same bytes.

    torch.save names the zip archive's top folder after the file it is given (the random
    temporary name here), which made every checkpoint of the same weights differ. Given an open
    file it uses the fixed name "archive"; the other records (storage keys in order of first use,
    zip timestamps fixed at 1980, a serialization id derived from the content) are deterministic."""
    import torch
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError:
                # torch reports a failed write as "unexpected pos ..." (its zip writer): name
                # the real cause when the disk is full
                if disk_full(Path(path).parent):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
                raise


# ------------------------------------------------------------------------------------------------
# what a file is, from its first bytes (for error messages about files given in the wrong place)
# ------------------------------------------------------------------------------------------------
HEAD_BYTES = 64  # enough for every signature below and a readable excerpt

# Torch's legacy (pre-1.6, or _use_new_zipfile_serialization=False) files open with a protocol-2
# pickle of the magic number 0x1950a86a20f9469cfc6c (torch/serialization.py, MAGIC_NUMBER).
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SIGNATURES = (  # (leading bytes, kind, what it is)
    (b"PK\x03\x04", "zip", "a zip archive"),
    (b"PK\x05\x06", "zip", "an empty zip archive"),
    (_TORCH_LEGACY_HEAD, "torch-legacy", "a legacy-format PyTorch file"),
    ((0x112).to_bytes(8, "little"), "mxnet", "an MXNet .params file"),
    (b"\x93NUMPY", "npy", "a numpy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "hdf5", "an HDF5 file (e.g. Keras .h5)"),
    (b"\x1f\x8b", "gzip", "a gzip-compressed file (unpack it first)"),
    (b"\x89PNG", "image", "a PNG image"),
    (b"\xff\xd8\xff", "image", "a JPEG image"),
)


def describe_file_start(head: bytes) -> Tuple[str, str]:
    """(kind, words) for the first bytes of a file, for one-line error messages.

    kind is one of "empty", "zip", "torch-legacy", "mxnet", "npy", "hdf5", "gzip", "image",
    "pickle", "text" or "binary"; words says what the bytes look like, e.g.
    "text 'hello world\\n'" or "bytes 3f a2 07 ..." (always printable, never a newline)."""
    if not head:
        return "empty", "nothing (0 bytes)"
    for sig, kind, what in _SIGNATURES:
        if head.startswith(sig):
            return kind, f"{head[:len(sig)]!r}, {what}"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", f"{head[:2]!r}, a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # the cut may fall inside a multi-byte character
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        words = "an HTML page" if text.lstrip()[:1] == "<" else "text"
        return "text", f"{words} {text[:32]!r}"
    return "binary", "bytes " + " ".join(f"{b:02x}" for b in head[:8]) + " ..."


def read_file_start(path, n: int = HEAD_BYTES) -> bytes:
    """The first n bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as f:
        return f.read(n)
