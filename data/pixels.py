"""Read image and saliency files at their real bit depth, or refuse them (docs/data.md, "Bit depth").

The published code reads every file with ``Image.open(path).convert("RGB")`` (EPS
metadata/dataset.py). That is exact for 8-bit files, but not for the others PIL can open:

* a 16-bit grayscale PNG opens in mode ``I;16`` and ``convert("RGB")`` clips every value above
  255 to 255, so a 16-bit saliency map becomes fully salient wherever it is not exactly 0;
* a 16-bit colour PNG (RGB, RGBA, gray + alpha) opens in an 8-bit mode holding only the high
  byte of each value, so nothing in the opened image shows that the file was 16-bit;
* modes ``I`` (32-bit integers) and ``F`` (floats) have no 0..255 scale at all.

``to_8bit`` is the one place that decides, per file: 8-bit files go on unchanged (the published
pipeline, bit for bit); 16-bit grayscale is read at its real depth as ``round(v / 257)``, which
maps 0..65535 onto 0..255 and turns a map stored as ``257 * k`` into exactly its 8-bit twin ``k``;
everything else is refused with a one-line ``DataError`` that names the file and the fix.
The module needs only PIL and numpy, so tools/check_dataset.py can use it without torch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from data.errors import DataError

# 8-bit modes whose convert("RGB") is exact: the published reading, kept unchanged. CMYK and
# YCbCr come from JPEGs.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
# 8-bit modes with an alpha channel, which convert("RGB") drops.
ALPHA_MODES = ("LA", "PA", "RGBA")
# Modes in which PIL opens 16-bit grayscale: I;16 (Pillow >= 10 for PNG), I;16B / I;16L (TIFF,
# raw data) and I (older Pillow for PNG; here accepted only when its values fit in 0..65535).
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FIX = {"saliency map": "save it as an 8-bit grayscale PNG (values 0..255)",
        "image": "save it as an 8-bit image (JPEG, or an 8-bit RGB / grayscale PNG)"}


class PixelFormatError(DataError):
    """A file whose pixels cannot be read as published without a wrong value. ``reason`` is the
    short description that tools/check_dataset.py puts in its table."""

    def __init__(self, what: str, path, reason: str):
        self.reason = reason
        super().__init__(f"{what} {path} is {reason}; {_FIX.get(what, _FIX['image'])}")


def png_bit_depth(path) -> Optional[int]:
    """Bits per sample from a PNG's IHDR chunk (1, 2, 4, 8 or 16); None when the file is not a PNG.

    PNG layout: 8-byte signature, then the IHDR chunk (4-byte length, b"IHDR", width, height,
    bit depth at byte 24, colour type at byte 25)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24]


def sixteen_to_8bit(values: np.ndarray) -> np.ndarray:
    """uint8 ``round(v / 257)`` of integers in 0..65535 (257 * k -> k exactly).

    Computed in integers as ``(v + 128) // 257``: v / 257 is never exactly k + 0.5 (257 is odd),
    so this equals rounding to the nearest, with no float ties to worry about."""
    v = np.asarray(values).astype(np.int64)
    return ((v + 128) // 257).astype(np.uint8)


def to_8bit(img: Image.Image, path, what: str = "saliency map",
            opaque_alpha: bool = True) -> Image.Image:
    """The image ready for the published ``convert("RGB")``: ``img`` itself for 8-bit files, a
    mode-'L' image for 16-bit grayscale (``round(v / 257)``); otherwise a ``PixelFormatError``.

    ``what`` names the file in the message ("saliency map" or "image"). ``opaque_alpha=True``
    refuses an alpha channel that is not fully opaque: the published reading ignores alpha, so a
    saliency drawn in the alpha channel would be read as the (often uniform) colour channels.
    Header-only for 8-bit files without alpha (works on a lazily opened image); the other cases
    decode the pixels.
    """
    mode = img.mode
    if mode in EIGHT_BIT_MODES + ALPHA_MODES:
        # PIL opens 16-bit colour PNGs in these modes with the high byte of each value.
        if img.format == "PNG" and mode in ("RGB", "RGBA") and png_bit_depth(path) == 16:
            kind = "colour" if mode == "RGB" else "colour/gray with alpha"
            raise PixelFormatError(what, path, f"a 16-bit {kind} PNG (PIL keeps only the high "
                                               f"byte of each value)")
        if mode in ALPHA_MODES and opaque_alpha:
            low, _ = img.getchannel("A").getextrema()
            if low < 255:
                raise PixelFormatError(what, path, f"a mode-{mode} file with a transparent alpha "
                                                   f"channel (the published code ignores alpha)")
        return img
    if mode in SIXTEEN_BIT_GRAY_MODES:
        values = np.asarray(img)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise PixelFormatError(what, path, f"a mode-{mode} file with values {low}..{high}, "
                                               f"outside the 16-bit range 0..65535")
        if 0 < high <= 255:
            # round(v / 257) would make it all but black: almost surely 8-bit values written
            # into a 16-bit file, for which neither reading is right.
            raise PixelFormatError(what, path, f"16-bit grayscale with values only up to {high} "
                                               f"of 65535 (8-bit values stored as 16-bit?)")
        return Image.fromarray(sixteen_to_8bit(values), mode="L")
    raise PixelFormatError(what, path, f"in pixel mode {mode}, which has no defined 8-bit reading")


def saliency_to_8bit(img: Image.Image, path) -> Image.Image:
    """``to_8bit`` for saliency maps (an alpha channel must be fully opaque)."""
    return to_8bit(img, path, "saliency map", opaque_alpha=True)


def image_to_8bit(img: Image.Image, path) -> Image.Image:
    """``to_8bit`` for training / inference images; alpha is dropped as published."""
    return to_8bit(img, path, "image", opaque_alpha=False)


def is_sixteen_bit(img: Image.Image) -> bool:
    """Whether ``to_8bit`` reads this (accepted) image as 16-bit grayscale."""
    return img.mode in SIXTEEN_BIT_GRAY_MODES
