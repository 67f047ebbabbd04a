"""Visual checks of CAMs and pseudo-masks: one PNG per image with the image, the pseudo-mask
overlaid in VOC colours, and one heat map per present class, tiled into a grid with captions and
a legend. Looking at a few of these catches most pipeline mistakes (wrong labels, flipped CAMs, a
wrong threshold) faster than reading an mIoU.

Layout rules, for pictures that explain themselves:
- captions sit in a strip above their tile, never on the image (a label over a corner of a small
  image hides a third of it);
- tiles are at least ``min_side`` px on their long side (small images are enlarged by an integer
  factor with nearest-neighbour sampling, so their pixels stay square and sharp) and at most
  ``max_side`` (a 500x375 VOC image is shrunk to 320x240);
- the panels fill balanced rows (one row when they fit), so no grid cell is left blank;
- a legend under the tiles names the mask colours and shows the heat-map colour scale.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.io import atomic_path, voc_palette

WHITE = (255, 255, 255)
INK = (20, 20, 20)
CAPTION_BG = (232, 232, 232)
CAPTION_SIZE = 14      # px; readable at 100% zoom and still fits ~24 characters on a 192 px tile
MARGIN = 8             # px of white around a whole figure
IGNORE = 255           # the VOC "ignore" label
Entry = Tuple[str, Optional[Tuple[int, int, int]]]   # legend: (label, RGB or None = untinted)


# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------
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


def label_name(value: int, class_names: Sequence[str]) -> str:
    """Name of a mask value: 0 = background, v = class_names[v - 1], 255 = ignore."""
    if value == 0:
        return "background"
    if value == IGNORE:
        return "ignore (255)"
    return class_names[value - 1] if value - 1 < len(class_names) else f"class {value}"


def legend_entries(values, class_names: Sequence[str], background: bool = True) -> List[Entry]:
    """Legend rows for the mask values present: every class in its VOC colour, then the
    background (drawn untinted by :func:`blend`, so its swatch is empty) and "ignore" when 255
    is among the values."""
    present = sorted({int(v) for v in np.unique(np.asarray(values))})
    pal = voc_palette()
    entries: List[Entry] = [(label_name(v, class_names), tuple(int(c) for c in pal[v]))
                            for v in present if v not in (0, IGNORE)]
    if background:
        entries.append(("background (untinted)", None))
    if IGNORE in present:
        entries.append((label_name(IGNORE, class_names), tuple(int(c) for c in pal[IGNORE])))
    return entries


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def font(size: int = CAPTION_SIZE, bold: bool = False):
    """DejaVu Sans, which ships inside matplotlib (a dependency already), so captions look the
    same on every machine; Pillow's own font if it cannot be loaded."""
    try:
        import matplotlib
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name),
                                  size)
    except (ImportError, OSError):
        try:
            return ImageFont.load_default(size)      # Pillow >= 10.1 with FreeType
        except (TypeError, OSError):
            return ImageFont.load_default()


def text_width(text: str, f) -> int:
    return int(math.ceil(f.getlength(text)))


def line_height(f) -> int:
    """Height of one line of text, the same for every string (so strips of one figure align)."""
    if hasattr(f, "getmetrics"):
        ascent, descent = f.getmetrics()
        return ascent + descent
    box = f.getbbox("Ag")
    return box[3] - box[1]


def fit_text(text: str, f, width: int) -> str:
    """``text``, cut with an ellipsis where it would be wider than ``width`` px."""
    if text_width(text, f) <= width:
        return text
    while text and text_width(text + "…", f) > width:
        text = text[:-1]
    return text.rstrip() + "…" if text else ""


def text_strip(text: str, width: int, size: int = CAPTION_SIZE, bold: bool = False,
               align: str = "left", bg=CAPTION_BG, fg=INK, pad: int = 3) -> np.ndarray:
    """One line of text on a ``width`` px wide band (uint8 RGB)."""
    f = font(size, bold)
    h = line_height(f) + 2 * pad
    img = Image.new("RGB", (max(1, width), h), bg)
    text = fit_text(text, f, width - 2 * pad)
    x = {"left": pad, "center": (width - text_width(text, f)) // 2,
         "right": width - pad - text_width(text, f)}[align]
    ImageDraw.Draw(img).text((x, pad), text, font=f, fill=fg)
    return np.asarray(img)


def captioned(tile: np.ndarray, text: str, size: int = CAPTION_SIZE, bold: bool = False,
              below: bool = False) -> np.ndarray:
    """``tile`` with ``text`` in a strip above it (or below): the tile's pixels are not touched,
    and tiles captioned with the same ``size`` stay the same height."""
    strip = text_strip(text, tile.shape[1], size=size, bold=bold)
    return np.concatenate([tile, strip] if below else [strip, tile], axis=0)


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
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


def row_lengths(n: int, max_columns: int) -> List[int]:
    """Panels per row: one row when ``n`` fits in ``max_columns``, otherwise the fewest rows,
    filled evenly: 7 with at most 6 a row -> [4, 3], not [6, 1]; 5 with at most 4 -> [3, 2], not
    a 4-wide grid with three blank cells (tile_rows centres the shorter row)."""
    if n <= 0:
        return []
    rows = -(-n // max(1, max_columns))
    base, extra = divmod(n, rows)
    return [base + 1] * extra + [base] * (rows - extra)


def stack(blocks: Sequence[np.ndarray], axis: int = 0, pad: int = 4,
          align: str = "center") -> np.ndarray:
    """Concatenate RGB blocks of different sizes along ``axis`` (0 = top to bottom), with ``pad``
    px of white between them; narrower blocks are centred (or aligned "start")."""
    other = 1 - axis
    size = max(b.shape[other] for b in blocks)
    parts = []
    for i, b in enumerate(blocks):
        short = size - b.shape[other]
        before = short // 2 if align == "center" else 0
        widths = [(0, 0), (0, 0), (0, 0)]
        widths[other] = (before, short - before)
        parts.append(np.pad(b, widths, constant_values=255))
        if pad and i < len(blocks) - 1:
            gap = [0, 0, 3]
            gap[axis], gap[other] = pad, size
            parts.append(np.full(gap, 255, np.uint8))
    return np.concatenate(parts, axis=axis)


def pad_to(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """``a`` centred on a white (height, width) canvas at least as large as itself."""
    dh, dw = max(0, hw[0] - a.shape[0]), max(0, hw[1] - a.shape[1])
    return np.pad(a, [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)],
                  constant_values=255)


def tile_rows(tiles: Sequence[np.ndarray], max_columns: int = 6, pad: int = 4) -> np.ndarray:
    """Equally sized tiles in balanced rows (see :func:`row_lengths`), a shorter row centred."""
    rows, i = [], 0
    for n in row_lengths(len(tiles), max_columns):
        rows.append(stack(tiles[i:i + n], axis=1, pad=pad))
        i += n
    return stack(rows, axis=0, pad=pad)


def with_margin(img: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    return np.pad(img, [(margin, margin), (margin, margin), (0, 0)], constant_values=255)


# --------------------------------------------------------------------------------------------
# resizing
# --------------------------------------------------------------------------------------------
def display_size(h: int, w: int, min_side: int = 192, max_side: int = 320) -> Tuple[int, int]:
    """(height, width) of a tile for an h x w image: shrunk to ``max_side`` on its long side, or
    enlarged by the smallest integer factor that reaches ``min_side`` (integer, so that
    nearest-neighbour enlarging keeps every pixel a square block)."""
    long = max(h, w)
    if long > max_side:
        s = max_side / long
        return max(1, round(h * s)), max(1, round(w * s))
    k = max(1, -(-min_side // long)) if long < min_side else 1
    return h * k, w * k


def resize_rgb(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Shrink smoothly, enlarge with sharp pixels (synthetic demo images are pixel art)."""
    if a.shape[:2] == tuple(hw):
        return a
    mode = Image.BILINEAR if hw[0] < a.shape[0] else Image.NEAREST
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), mode))


def resize_labels(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == tuple(hw):
        return a
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.NEAREST))


def resize_map(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """A float score map, smoothly both ways (it is smooth already)."""
    a = np.asarray(a, np.float32)
    if a.shape[:2] == tuple(hw):
        return a
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.BILINEAR))


# --------------------------------------------------------------------------------------------
# legend
# --------------------------------------------------------------------------------------------
def _swatch(rgb, s: int) -> np.ndarray:
    """A filled square, or an outlined empty one for "untinted"."""
    if rgb is None:
        sw = np.full((s, s, 3), 255, np.uint8)
    else:
        sw = np.empty((s, s, 3), np.uint8)
        sw[:] = rgb
    sw[[0, -1], :] = 90
    sw[:, [0, -1]] = 90
    return sw


def _text_block(text: str, f) -> np.ndarray:
    img = Image.new("RGB", (max(1, text_width(text, f)), line_height(f)), WHITE)
    ImageDraw.Draw(img).text((0, 0), text, font=f, fill=INK)
    return np.asarray(img)


def _colour_bar(f, width: int = 120) -> np.ndarray:
    """'0 [blue..red] 1': the heat-map scale."""
    h = line_height(f)
    bar = heatmap(np.tile(np.linspace(0, 1, width, dtype=np.float32), (max(1, h - 4), 1)))
    bar = np.pad(bar, [(2, 2), (0, 0), (0, 0)], constant_values=255)
    return stack([_text_block("0", f), bar, _text_block("1", f)], axis=1, pad=4)


def legend(width: int, entries: Sequence[Entry], title: str = "",
           colour_bar: Optional[str] = None, size: int = CAPTION_SIZE) -> np.ndarray:
    """Legend band ``width`` px wide: "title: [swatch] name  [swatch] name ...", wrapped onto
    more lines when it does not fit (a swatch stays on the line of its name); with
    ``colour_bar`` ("heading: note"), a new line with the heat-map scale and the note."""
    f, fb = font(size), font(size, bold=True)
    h = line_height(f)
    space = text_width(" ", f)
    # (block, gap before it in px); None starts a new line
    items: List[Optional[Tuple[np.ndarray, int]]] = []
    if title:
        items.append((_text_block(title, fb), 0))
    for name, rgb in entries:
        items.append((stack([_swatch(rgb, h), _text_block(name, f)], axis=1, pad=4), 3 * space))
    if colour_bar is not None:
        items.append(None)
        head, _, note = colour_bar.partition(": ") if ": " in colour_bar else ("", "", colour_bar)
        if head:
            items.append((_text_block(head + ":", fb), 0))
        items.append((_colour_bar(f), space))
        # the note flows word by word, like text, set off from the bar's "1"
        items += [(_text_block(w, f), 3 * space if i == 0 else space)
                  for i, w in enumerate(note.split())]
    lines: List[List[Tuple[np.ndarray, int]]] = [[]]
    used = 0
    for item in items:
        if item is None:
            lines.append([])
            used = 0
            continue
        block, gap = item
        if lines[-1] and used + gap + block.shape[1] > width:
            lines.append([])
            used = 0
        used += (gap if lines[-1] else 0) + block.shape[1]
        lines[-1].append(item)
    rows = []
    for line in lines:
        if not line:
            continue
        parts = [line[0][0]]
        for block, gap in line[1:]:
            parts += [np.full((h, gap, 3), 255, np.uint8), block]
        rows.append(stack(parts, axis=1, pad=0))
    band = stack(rows, axis=0, pad=6, align="start")
    # Only a single item wider than ``width`` (a very narrow figure) makes the band wider.
    return stack([band, np.full((0, width, 3), 255, np.uint8)], axis=0, pad=0, align="start")


# --------------------------------------------------------------------------------------------
# the overview written by infer.py --vis-dir
# --------------------------------------------------------------------------------------------
def heat_note(with_bg: bool) -> str:
    """The colour-bar caption of the overview's legend."""
    what = "CAM score of the class, or background score of EPS" if with_bg else \
        "CAM score of the class"
    return f"heat maps: {what}, blended 50% over the image"


def cam_overview(image: np.ndarray, mask: np.ndarray, keys: Sequence[int], cams: np.ndarray,
                 class_names: Sequence[str], bg: Optional[np.ndarray] = None,
                 title: str = "", max_side: int = 320, columns: int = 6,
                 min_side: int = 192) -> np.ndarray:
    """[image | pseudo-mask overlay | (EPS background) | CAM of each class] in balanced rows of at
    most ``columns`` tiles, ``title`` above and a legend below. ``keys`` are 0-based class
    indices (class_names[k]); ``mask`` holds 0 = background and k + 1 = class k."""
    image = np.asarray(image, np.uint8)
    mask = np.asarray(mask, np.uint8)
    hw = display_size(*image.shape[:2], min_side=min_side, max_side=max_side)
    img_s = resize_rgb(image, hw)
    mask_s = resize_labels(mask, hw)
    tiles: List[np.ndarray] = [
        captioned(img_s, "image"),
        captioned(blend(img_s, colorize_mask(mask_s), 0.6, where=mask_s > 0), "pseudo-mask"),
    ]
    maps = ([("background", bg)] if bg is not None else []) + [
        (class_names[k] if k < len(class_names) else f"class {k}", cams[i])
        for i, k in enumerate(keys)]
    for name, m in maps:
        m = np.asarray(m, np.float32)
        tiles.append(captioned(blend(img_s, heatmap(resize_map(m, hw)), 0.5),
                               f"{name}, max {float(np.nanmax(m)) if m.size else 0.0:.2f}"))
    grid = tile_rows(tiles, max_columns=columns)
    width = grid.shape[1]
    key = legend(width, legend_entries(mask, class_names), title="pseudo-mask:",
                 colour_bar=heat_note(bg is not None))
    parts = [grid, key]
    if title:
        parts.insert(0, text_strip(title, width, size=CAPTION_SIZE + 2, bold=True, bg=WHITE))
    return with_margin(stack(parts, axis=0, pad=6, align="start"))


def save_cam_overview(path, *args, **kwargs) -> None:
    """cam_overview written atomically as PNG."""
    grid = cam_overview(*args, **kwargs)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
