"""Visual checks of CAMs and pseudo-masks: one PNG per image with the image, the pseudo-mask
overlaid in VOC colours, and one heat map per present class, tiled into a grid with captions.
Looking at a few of these catches most pipeline mistakes (wrong labels, flipped CAMs, a wrong
threshold) faster than reading an mIoU."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.io import atomic_path, voc_palette


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(H,W) map in [0,1] -> uint8 RGB 'jet' colours (blue = 0, red = 1)."""
    from matplotlib import colormaps
    cam = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
    return (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5,
          where: Optional[np.ndarray] = None) -> np.ndarray:
    """alpha-blend two uint8 RGB images; ``where`` (H,W bool) limits the overlay to some pixels."""
    out = image.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha
    if where is not None:
        out = np.where(where[..., None], out, image.astype(np.float32))
    return out.round().astype(np.uint8)


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """uint8 label map -> RGB with the VOC palette (0 = black background)."""
    return voc_palette()[np.asarray(mask, np.uint8)]


def captioned(tile: np.ndarray, text: str) -> np.ndarray:
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    # A dark box behind the text keeps it readable on any image.
    box = draw.textbbox((2, 2), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


def tile(tiles: Sequence[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    """Arrange equally sized uint8 RGB tiles in a grid (white padding)."""
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    canvas = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = t
    return canvas


def cam_overview(image: np.ndarray, mask: np.ndarray, keys: Sequence[int], cams: np.ndarray,
                 class_names: Sequence[str], bg: Optional[np.ndarray] = None,
                 title: str = "", max_side: int = 400, columns: int = 4) -> np.ndarray:
    """The overview grid: [image | pseudo-mask overlay | (EPS background) | CAM of each class]."""
    image = np.asarray(image, np.uint8)
    mask = np.asarray(mask, np.uint8)
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))

    def shrink(a, resample):
        return np.asarray(Image.fromarray(a).resize(size, resample)) if scale < 1 else a

    img_s = shrink(image, Image.BILINEAR)
    mask_s = shrink(mask, Image.NEAREST)
    present = sorted({int(v) for v in np.unique(mask_s)} - {0})
    names = ", ".join(class_names[v - 1] for v in present if v - 1 < len(class_names)) or "background"
    tiles: List[np.ndarray] = [
        captioned(img_s, title or "image"),
        captioned(blend(img_s, colorize_mask(mask_s), 0.6, where=mask_s > 0), f"mask: {names}"),
    ]
    maps = ([("bg (eps)", bg)] if bg is not None else []) + [
        (class_names[k] if k < len(class_names) else str(k), cams[i]) for i, k in enumerate(keys)]
    for name, m in maps:
        m = np.asarray(m, np.float32)
        m_s = np.asarray(Image.fromarray(m).resize(size, Image.BILINEAR)) if scale < 1 else m
        tiles.append(captioned(blend(img_s, heatmap(m_s), 0.5), f"{name} max {float(m.max()):.2f}"))
    return tile(tiles, columns=columns)


def save_cam_overview(path, *args, **kwargs) -> None:
    """cam_overview written atomically as PNG."""
    grid = cam_overview(*args, **kwargs)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
