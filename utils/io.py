"""Atomic file output: every writer goes through a temporary file in the target folder and an
``os.replace``, so a crash or kill never leaves a half-written PNG, npz or checkpoint behind, and
a resumed job can trust that an existing output file is complete."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()



@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it is renamed onto ``path`` only if the block
    succeeds. The temporary name keeps the suffix so libraries that dispatch on it still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """torch.save through a temporary file."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
