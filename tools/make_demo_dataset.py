"""Generate the built-in demo dataset: small synthetic images where context fools a CAM.

"Railroad is not a train": every ``train`` stands on a ``railroad`` band and every ``boat`` floats
on ``water``. The context regions are background in the ground truth and are not salient, but they
co-occur perfectly with their class, so a classifier trained with image labels alone learns to use
them and its CAM labels railroad pixels as train. The saliency maps (imperfect, like an
off-the-shelf detector's) tell EPS where the objects end.

    python tools/make_demo_dataset.py --out demo_data    # 1,800 images, ~15 s of one core (docs/demo.md)

Layout (the ``custom`` dataset of data/registry.py, i.e. the VOC layout):

    ROOT/JPEGImages/<id>.jpg             RGB image, size x size
    ROOT/SegmentationClassAug/<id>.png   ground truth, VOC palette PNG: 0 = background,
                                         c+1 = class c, 255 = ignore (thin ring inside object edges)
    ROOT/SALImages/<id>.png              saliency, 8-bit grayscale 0..255 (255 = salient)
    ROOT/ContextMasks/<id>.png           context, palette PNG: 0 = none, 1 = railroad, 2 = water;
                                         only pixels that are background (0) in the ground truth
    ROOT/labels.txt                      "0 background", then "<c+1> <class name>"
    ROOT/image_labels.txt                "<id> <c> ..." (0-based indices of the classes present)
    ROOT/context.txt                     "<value> <context name> <class name>" (1 railroad train, ...)
    ROOT/saliency_flaws.txt              "<id> missed=<class> false_blob ...": the saliency's
                                         deliberate flaws (tools/eval_saliency.py finds them)
    ROOT/train.txt, train_aug.txt, val.txt   id lists (train_aug = train, for the published scripts)
    ROOT/dataset_info.json               the generator settings (seed, size, counts, classes)

Every image is drawn from its own random stream seeded by (seed, split, index), so the same seed
always gives the same bytes, and a larger --num-train adds images without changing the others.
"""
from __future__ import annotations

import argparse
import colorsys
import functools
import io
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.metadata import (atomic_write_text, write_class_names, write_id_list,  # noqa: E402
                           write_image_labels)
from utils.cli import run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import save_label_png  # noqa: E402
from utils.progress import Progress  # noqa: E402

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CLASS_NAMES: Tuple[str, ...] = ("train", "boat", "ball", "star", "kite")
# Context value in ContextMasks/*.png -> (context name, the class it always comes with).
CONTEXTS: Dict[int, Tuple[str, str]] = {1: ("railroad", "train"), 2: ("water", "boat")}
CONTEXT_OF_CLASS = {cls: (value, name) for value, (name, cls) in CONTEXTS.items()}
SPLIT_CODES = {"train": 0, "val": 1}
IGNORE = 255


@dataclass
class Layer:
    """One drawn thing: a boolean mask and its colours (float RGB 0..255, valid under the mask)."""
    mask: np.ndarray
    rgb: np.ndarray


@dataclass
class Sample:
    image: np.ndarray        # uint8 (S, S, 3) RGB
    gt: np.ndarray           # uint8 (S, S): 0 bg, c+1 class c, 255 ignore
    saliency: np.ndarray     # uint8 (S, S)
    context: np.ndarray      # uint8 (S, S): 0 none, else a CONTEXTS value
    labels: List[int] = field(default_factory=list)  # 0-based class indices present in gt
    # the saliency's deliberate flaws: "missed=<class>" (a large part of the object lost),
    # "false_blob" (a salient blob on plain background); written to saliency_flaws.txt
    flaws: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """Knobs of the generator (the defaults are the tuned demo values)."""
    size: int = 96
    classes: Tuple[str, ...] = CLASS_NAMES
    ignore_border: int = 1       # width (px) of the 255 ring inside object edges; 0 = none
    miss_prob: float = 0.08      # per object: the saliency misses a large part of it
    false_pos_prob: float = 0.3  # per image: one salient blob on plain background
    jpeg_quality: int = 90


# ---------------------------------------------------------------------------------------------
# small drawing helpers (vectorised numpy + cv2; sizes are relative to the image size S)

@functools.lru_cache(maxsize=8)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32) * 255.0


def _jitter(rng, rgb, hue=0.03, sat=0.15, val=0.15) -> np.ndarray:
    """Per-image colour variation around a class's base colour."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))
    return _hsv(h + rng.uniform(-hue, hue), s * rng.uniform(1 - sat, 1 + sat),
                v * rng.uniform(1 - val, 1 + val))


def _fill_poly(size: int, pts) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    # 4 fractional bits: sub-pixel vertex positions keep small shapes from snapping to the grid.
    cv2.fillPoly(m, [np.round(np.asarray(pts, np.float64) * 16).astype(np.int32)], 1,
                 lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = _grid(size)
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _lowfreq(rng, size: int, cells: int, channels: int = 0) -> np.ndarray:
    """Smooth random field in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    shape = (cells, cells, channels) if channels else (cells, cells)
    small = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _paint(canvas: np.ndarray, mask: np.ndarray, rgb) -> None:
    canvas[mask] = rgb if np.ndim(rgb) == 1 else rgb[mask]


# ---------------------------------------------------------------------------------------------
# backgrounds: gradients, smooth colour noise and clutter (never salient, never a class)

def draw_background(rng, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    c1 = _hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.9))
    c2 = _hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.9))
    kind = rng.integers(3)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(a) + yy * np.sin(a)) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == 1:  # smooth colour noise
        t = (_lowfreq(rng, size, int(rng.integers(3, 7))) + 1) / 2
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        img += 25 * _lowfreq(rng, size, int(rng.integers(4, 9)), 3)
    else:  # flat colour (cluttered below)
        img = np.broadcast_to(c1, (size, size, 3)).copy()
    img = img.astype(np.float32)
    # Clutter: random muted rectangles, ellipses, lines and triangles (hard negatives).
    mean = img.reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(0, 7 if kind < 2 else 12))):
        # Muted, near the background colour: distractors, not objects a tiny CNN must out-learn.
        col = tuple(float(c) for c in np.clip(mean + rng.normal(0, 45, 3), 0, 255))
        x, y = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.03, 0.2, 2) * size
        shape = rng.integers(4)
        if shape == 0:
            cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), col, -1)
        elif shape == 1:
            cv2.ellipse(img, (int(x), int(y)), (max(int(w / 2), 1), max(int(h / 2), 1)),
                        float(rng.uniform(0, 180)), 0, 360, col, -1)
        elif shape == 2:
            x2, y2 = rng.uniform(0, size, 2)
            cv2.line(img, (int(x), int(y)), (int(x2), int(y2)), col, int(rng.integers(1, 3)))
        else:
            pts = np.array([[x, y], [x + w, y + rng.uniform(-h, h)], [x + rng.uniform(-w, w), y + h]])
            cv2.fillPoly(img, [pts.astype(np.int32)], col)
    img += rng.normal(0, rng.uniform(2, 9), img.shape).astype(np.float32)
    return img


# ---------------------------------------------------------------------------------------------
# context regions (background in GT, not salient, always with their class)

def draw_railroad(rng, size: int) -> Tuple[Layer, float]:
    """A full-width ballast band with sleepers and two rails; returns it and the rail height.
    The band has about the area of the train (see draw_water for why)."""
    yy, xx = _grid(size)
    rail_y = rng.uniform(0.5, 0.84) * size
    band_h = rng.uniform(0.1, 0.14) * size
    mask = (yy >= rail_y - 1) & (yy < rail_y + band_h)
    ballast = _jitter(rng, (125, 112, 98), hue=0.04, sat=0.3, val=0.2)
    # Gravel: high-frequency grey noise, the texture that makes the band easy to recognise.
    rgb = ballast + rng.normal(0, 22, (size, size, 1)).astype(np.float32)
    pitch = rng.uniform(0.06, 0.09) * size
    width = max(1.5, rng.uniform(0.02, 0.035) * size)
    sleepers = ((xx + rng.uniform(0, pitch)) % pitch < width) & (yy > rail_y + 0.1 * band_h) \
        & (yy < rail_y + 0.85 * band_h)
    _paint(rgb, sleepers, _jitter(rng, (85, 55, 35)) + rng.normal(0, 8, (size, size, 1)).astype(np.float32))
    steel = _jitter(rng, (200, 200, 210), sat=0.2, val=0.1)
    for y0 in (rail_y, rail_y + rng.uniform(0.4, 0.55) * band_h):
        _paint(rgb, (yy >= y0) & (yy < y0 + max(1.0, 0.018 * size)), steel)
    return Layer(mask, rgb), rail_y


def draw_water(rng, size: int) -> Tuple[Layer, float]:
    """Blue water from a random waterline to the bottom, darker with depth, with wave crests."""
    yy, xx = _grid(size)
    # About as much water as boat: a CAM covering boat and water still passes EPS's overlap
    # test (tau 0.4), so EPS can learn to carve the water out.
    water_y = rng.uniform(0.78, 0.86) * size
    mask = yy >= water_y
    top = _jitter(rng, (45, 110, 180), hue=0.05, sat=0.2, val=0.15)
    depth = np.clip((yy - water_y) / max(size - water_y, 1.0), 0, 1)[..., None]
    rgb = top * (1 - 0.45 * depth) + rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    crest = _jitter(rng, (150, 195, 235), hue=0.03, sat=0.2, val=0.1)
    spacing = rng.uniform(0.04, 0.07) * size
    wavelength = rng.uniform(0.12, 0.22) * size
    amp = rng.uniform(0.01, 0.025) * size
    phase = yy / spacing * 1.7  # neighbouring crests are out of phase
    wave = (yy - water_y + amp * np.sin(2 * np.pi * xx / wavelength + phase)) % spacing
    _paint(rgb, mask & (wave < max(1.0, 0.015 * size)), crest)
    return Layer(mask, rgb), water_y


# ---------------------------------------------------------------------------------------------
# objects (distinct shape, colour family and texture per class)

TRAIN_COLOURS = ((200, 40, 40), (230, 190, 40), (40, 150, 70), (230, 120, 30), (40, 80, 180))


def draw_train(rng, size: int, rail_y: float) -> Layer:
    """2-3 cars with a window row and a stripe, a sloped nose, wheels on the upper rail."""
    yy, xx = _grid(size)
    length = rng.uniform(0.5, 0.8) * size
    height = rng.uniform(0.17, 0.24) * size
    wheel_r = 0.16 * height
    bottom = rail_y - wheel_r
    top = bottom - height
    x0 = rng.uniform(-0.12 * length, size - 0.88 * length)
    n_cars = int(rng.integers(2, 4))
    gap = max(1.0, 0.02 * size)
    car_len = (length - gap * (n_cars - 1)) / n_cars
    nose_right = rng.random() < 0.5
    body = np.zeros((size, size), bool)
    wheels = np.zeros((size, size), bool)
    for k in range(n_cars):
        a, b = x0 + k * (car_len + gap), x0 + k * (car_len + gap) + car_len
        pts = [(a, top), (b, top), (b, bottom), (a, bottom)]
        if k == (n_cars - 1 if nose_right else 0):  # the locomotive's slanted front
            nose = 0.35 * height
            pts = ([(a, top), (b - nose, top), (b, bottom), (a, bottom)] if nose_right
                   else [(a + nose, top), (b, top), (b, bottom), (a, bottom)])
        body |= _fill_poly(size, pts)
        for wx in (a + 0.22 * car_len, b - 0.22 * car_len):
            wheels |= _disc(size, wx, rail_y - wheel_r, wheel_r)
    colour = _jitter(rng, TRAIN_COLOURS[rng.integers(len(TRAIN_COLOURS))])
    rgb = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
    rel = (yy - top) / height
    _paint(rgb, body & (rel > 0.62) & (rel < 0.78), 0.45 * colour)  # dark stripe
    _paint(rgb, body & (rel < 0.08), 0.7 * colour)  # roof
    win_pitch = 0.42 * height
    windows = body & (rel > 0.2) & (rel < 0.48) & (((xx - x0) % win_pitch) < 0.6 * win_pitch)
    _paint(rgb, windows, _jitter(rng, (185, 215, 235), sat=0.3, val=0.1))
    _paint(rgb, wheels, _jitter(rng, (45, 45, 50), val=0.3))
    return Layer(body | wheels, rgb)


HULL_COLOURS = ((235, 235, 228), (120, 70, 40), (170, 40, 40), (50, 55, 70))
SAIL_COLOURS = ((245, 245, 235), (240, 225, 190), (220, 60, 50), (245, 160, 40))


def draw_boat(rng, size: int, water_y: float) -> Layer:
    """A trapezoid hull across the waterline with plank lines, a mast and a triangular sail."""
    yy, xx = _grid(size)
    width = rng.uniform(0.45, 0.62) * size
    hull_h = width * rng.uniform(0.22, 0.3)
    cx = rng.uniform(0.5 * width, size - 0.5 * width)
    hull_top = water_y - 0.55 * hull_h
    hull_bot = hull_top + hull_h
    hull = _fill_poly(size, [(cx - width / 2, hull_top), (cx + width / 2, hull_top),
                             (cx + 0.33 * width, hull_bot), (cx - 0.33 * width, hull_bot)])
    mast_x = cx + rng.uniform(-0.1, 0.1) * width
    mast_top = max(hull_top - width * rng.uniform(0.75, 1.0), 0.04 * size)
    mast_w = max(1.0, 0.015 * size)
    mast = (np.abs(xx - mast_x) <= mast_w / 2 + 0.25) & (yy >= mast_top) & (yy < hull_top)
    side = 1 if rng.random() < 0.5 else -1
    sail = _fill_poly(size, [(mast_x + side * mast_w, mast_top + 0.05 * width),
                             (mast_x + side * mast_w, hull_top - 0.08 * width),
                             (mast_x + side * width * rng.uniform(0.4, 0.5), hull_top - 0.08 * width)])
    hull_c = _jitter(rng, HULL_COLOURS[rng.integers(len(HULL_COLOURS))])
    rgb = np.broadcast_to(hull_c, (size, size, 3)).astype(np.float32)
    planks = hull & (((yy - hull_top) % max(2.0, 0.3 * hull_h)) < 1.0)
    _paint(rgb, planks, 0.6 * hull_c)
    _paint(rgb, mast, _jitter(rng, (90, 60, 35)))
    sail_c = _jitter(rng, SAIL_COLOURS[rng.integers(len(SAIL_COLOURS))], sat=0.2, val=0.08)
    _paint(rgb, sail, sail_c)
    _paint(rgb, sail & (np.abs(yy - (mast_top + hull_top) / 2) < 0.02 * size + 0.5), 0.75 * sail_c)
    return Layer(hull | mast | sail, rgb)


def _place(rng, size: int, radius: float) -> Tuple[float, float]:
    return tuple(rng.uniform(radius, size - radius, 2))


def draw_ball(rng, size: int) -> Layer:
    """A shaded disc with polka dots or beach-ball sectors in two contrasting colours."""
    yy, xx = _grid(size)
    r = rng.uniform(0.1, 0.16) * size
    cx, cy = _place(rng, size, r)
    mask = _disc(size, cx, cy, r)
    hue = rng.random()
    # Dark saturated + near-white: a luminance pattern that survives colour jitter.
    c1, c2 = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.8)), _hsv(hue + 0.5, 0.1, 0.97)
    if rng.random() < 0.5:  # polka dots on a hexagonal-ish lattice
        pitch = r * rng.uniform(0.6, 0.8)
        u, v = (xx - cx) / pitch, (yy - cy) / pitch
        du, dv = u - np.round(u + 0.5 * (np.round(v) % 2)) + 0.5 * (np.round(v) % 2), v - np.round(v)
        pattern = du ** 2 + dv ** 2 < 0.1
    else:  # beach-ball sectors
        ang = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, np.pi)
        pattern = (np.floor(ang / (np.pi / 3)) % 2) == 0
    rgb = np.where(pattern[..., None], c2, c1).astype(np.float32)
    # Highlight up-left, shadow down-right: a round object, not a flat disc.
    hx, hy = cx - 0.35 * r, cy - 0.35 * r
    shade = 1.15 - 0.55 * np.clip(np.sqrt((xx - hx) ** 2 + (yy - hy) ** 2) / (1.6 * r), 0, 1)
    return Layer(mask, rgb * shade[..., None])


def _star_points(cx, cy, r_out, r_in, rot, n=5):
    ang = rot + np.arange(2 * n) * np.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def draw_star(rng, size: int) -> Layer:
    """A five-pointed star, yellow to orange, with concentric bands and a dark outline."""
    yy, xx = _grid(size)
    r = rng.uniform(0.13, 0.2) * size
    cx, cy = _place(rng, size, r)
    rot = rng.uniform(0, 2 * np.pi)
    mask = _fill_poly(size, _star_points(cx, cy, r, 0.45 * r, rot))
    colour = _hsv(rng.uniform(0.07, 0.16), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    band = (np.floor(d * rng.uniform(5, 7)) % 2)[..., None]
    rgb = colour * (1 - 0.4 * band)
    edge = max(1.5, 0.02 * size)
    inner = _fill_poly(size, _star_points(cx, cy, r - edge, 0.45 * r - 0.7 * edge, rot))
    _paint(rgb, mask & ~inner, 0.35 * colour)
    return Layer(mask, rgb.astype(np.float32))


def draw_kite(rng, size: int) -> Layer:
    """A tilted diamond in four checkered quadrants (two colours) with dark cross sticks."""
    yy, xx = _grid(size)
    h = rng.uniform(0.15, 0.22) * size  # half height
    w = h * rng.uniform(0.55, 0.75)
    cx, cy = _place(rng, size, h)
    tilt = rng.uniform(-0.5, 0.5)
    c, s = np.cos(tilt), np.sin(tilt)
    u = (xx - cx) * c + (yy - cy) * s       # kite-local coordinates
    v = -(xx - cx) * s + (yy - cy) * c
    cross_v = -0.3 * h  # the cross stick sits above the centre, as on a real kite
    vv = np.where(v < cross_v, (v - cross_v) / (h + cross_v), (v - cross_v) / (h - cross_v))
    mask = np.abs(u) / w + np.abs(vv) <= 1.0
    hue = rng.random()
    c1, c2 = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)), _hsv(hue + 0.33, 0.8, 0.9)
    quad = ((u > 0) ^ (v > cross_v))[..., None]
    rgb = np.where(quad, c1, c2).astype(np.float32)
    half = max(0.6, 0.008 * size)
    stick = mask & ((np.abs(u) < half) | (np.abs(v - cross_v) < half))
    _paint(rgb, stick, _jitter(rng, (60, 40, 30)))
    return Layer(mask, rgb)


# Class name -> drawing function. Context-bound classes take the context's anchor height.
FREE_OBJECTS: Dict[str, Callable] = {"ball": draw_ball, "star": draw_star, "kite": draw_kite}
CONTEXT_OBJECTS: Dict[str, Tuple[Callable, Callable]] = {
    "train": (draw_railroad, draw_train), "boat": (draw_water, draw_boat)}
assert set(FREE_OBJECTS) | set(CONTEXT_OBJECTS) == set(CLASS_NAMES)


# ---------------------------------------------------------------------------------------------
# saliency: the GT foreground degraded like an off-the-shelf detector's output

def make_saliency(rng, size: int, objects: Sequence[Layer], context: np.ndarray,
                  settings: Settings, flaws: Optional[List] = None) -> np.ndarray:
    """The degraded saliency map; ``flaws`` (when given) receives the index of each object a
    miss hit (an int) and "false_blob" when a false positive was drawn (records only: the
    random draws are the same either way)."""
    s = size / 96.0
    sal = np.zeros((size, size), np.float32)
    for k, obj in enumerate(objects):
        # Wobbly edges: blur the mask, add a smooth random field and re-threshold.
        soft = cv2.GaussianBlur(obj.mask.astype(np.float32), (0, 0), 1.5 * s)
        wobble = soft + 0.3 * _lowfreq(rng, size, max(4, size // 8))
        part = (wobble > 0.5).astype(np.float32) * rng.uniform(0.8, 1.0)
        if rng.random() < settings.miss_prob:
            # A miss: a half-plane through the object loses most of its saliency.
            ys, xs = np.nonzero(obj.mask)
            if len(ys):
                yy, xx = _grid(size)
                a = rng.uniform(0, 2 * np.pi)
                proj = (xx - xs.mean()) * np.cos(a) + (yy - ys.mean()) * np.sin(a)
                cut = np.quantile(proj[obj.mask], rng.uniform(0.35, 0.65))
                part = np.where(proj > cut, part * rng.uniform(0.0, 0.3), part)
                if flaws is not None:
                    flaws.append(k)
        sal = np.maximum(sal, part)
    if rng.random() < settings.false_pos_prob:
        # A false positive on plain background (never on the context: it is not salient).
        free = np.flatnonzero(~context.astype(bool).ravel() & (sal.ravel() < 0.1))
        if len(free):
            y, x = divmod(int(free[rng.integers(len(free))]), size)
            axes = (max(1, int(rng.uniform(0.04, 0.1) * size)), max(1, int(rng.uniform(0.04, 0.1) * size)))
            blob = np.zeros((size, size), np.float32)
            cv2.ellipse(blob, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.4, 0.9)), -1)
            sal = np.maximum(sal, blob * ~context.astype(bool))
            if flaws is not None:
                flaws.append("false_blob")
    sal = cv2.GaussianBlur(sal, (0, 0), rng.uniform(0.7, 1.5) * s)
    sal += rng.normal(0, 0.02, sal.shape).astype(np.float32)
    return np.clip(np.round(sal * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# one sample

def _choose_classes(rng, classes: Sequence[str]) -> List[str]:
    """1-3 distinct classes; train and boat never together (one context per image)."""
    k = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    chosen = [str(c) for c in rng.permutation(classes)[:k]]
    ctx = [c for c in chosen if c in CONTEXT_OBJECTS]
    return [c for c in chosen if c not in CONTEXT_OBJECTS or c == (ctx[0] if ctx else None)]


def _ignore_ring(gt: np.ndarray, width: int) -> np.ndarray:
    """Set a ring of `width` px inside every object edge to 255, like VOC's boundary band."""
    if width <= 0:
        return gt
    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    edge = (cv2.dilate(gt, k) != gt) | (cv2.erode(gt, k) != gt)
    out = gt.copy()
    out[edge & (gt > 0)] = IGNORE
    return out


def generate_sample(rng: np.random.Generator, settings: Settings = Settings()) -> Sample:
    """Draw one image with its ground truth, saliency and context mask (pure function of rng)."""
    while True:  # weak supervision needs >= 1 class per image; a redraw is practically never needed
        sample = _draw_sample(rng, settings)
        if sample.labels:
            return sample


def _draw_sample(rng: np.random.Generator, settings: Settings) -> Sample:
    size = settings.size
    names = _choose_classes(rng, settings.classes)
    img = draw_background(rng, size)
    context = np.zeros((size, size), np.uint8)
    placed: List[Tuple[str, Layer]] = []
    for name in names:
        if name in CONTEXT_OBJECTS:
            draw_ctx, draw_obj = CONTEXT_OBJECTS[name]
            layer, anchor = draw_ctx(rng, size)
            _paint(img, layer.mask, layer.rgb)
            context[layer.mask] = CONTEXT_OF_CLASS[name][0]
            placed.insert(0, (name, draw_obj(rng, size, anchor)))  # drawn first: others may occlude it
    for name in names:
        if name in CONTEXT_OBJECTS:
            continue
        for _ in range(30):  # rejection sampling: little overlap, everything stays visible
            obj = FREE_OBJECTS[name](rng, size)
            area = obj.mask.sum()
            if area < max(4, 0.002 * size * size):
                continue
            if all((obj.mask & o.mask).sum() <= 0.15 * min(area, o.mask.sum()) for _, o in placed):
                placed.append((name, obj))
                break
    gt = np.zeros((size, size), np.uint8)
    for name, obj in placed:
        _paint(img, obj.mask, obj.rgb)
        gt[obj.mask] = settings.classes.index(name) + 1
    context[gt > 0] = 0
    hit: List = []
    sal = make_saliency(rng, size, [o for _, o in placed], context, settings, hit)
    flaws = [f"missed={placed[k][0]}" if isinstance(k, int) else k for k in hit]
    gt = _ignore_ring(gt, settings.ignore_border)
    labels = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v != IGNORE)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Sample(image=image, gt=gt, saliency=sal, context=context, labels=labels, flaws=flaws)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of every other image and of the counts."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


# ---------------------------------------------------------------------------------------------
# writing the dataset

def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(out: Path, num_train: int, num_val: int, seed: int,
                  settings: Settings = Settings(), overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Generate the whole dataset into a temporary sibling folder, then rename it onto `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it "
                              f"or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for sub in ("JPEGImages", "SegmentationClassAug", "SALImages", "ContextMasks"):
            (tmp / sub).mkdir()
        labels: Dict[str, List[int]] = {}
        flaw_lines = ["# <id> <flaw> ...: the saliency's deliberate flaws (tools/eval_saliency.py "
                      "should find them)", "# missed=<class>: a large part of that object is "
                      "not salient; false_blob: a salient blob on plain background"]
        splits = {"train": [image_id("train", i) for i in range(num_train)],
                  "val": [image_id("val", i) for i in range(num_val)]}
        jobs = [(split, i, img_id) for split, ids in splits.items() for i, img_id in enumerate(ids)]
        bar = Progress(len(jobs), "demo dataset", enabled=progress, unit="img")
        for split, i, img_id in jobs:
            bar.update(1)
            smp = generate_sample(sample_rng(seed, split, i), settings)
            (tmp / "JPEGImages" / f"{img_id}.jpg").write_bytes(_jpeg_bytes(smp.image, settings.jpeg_quality))
            save_label_png(tmp / "SegmentationClassAug" / f"{img_id}.png", smp.gt)
            save_label_png(tmp / "SALImages" / f"{img_id}.png", smp.saliency, palette=False)
            save_label_png(tmp / "ContextMasks" / f"{img_id}.png", smp.context)
            labels[img_id] = smp.labels
            if smp.flaws:
                flaw_lines.append(" ".join([img_id, *smp.flaws]))
        n = len(settings.classes)
        write_class_names(tmp / "labels.txt", ["background", *settings.classes])
        write_image_labels(tmp / "image_labels.txt",
                           {k: np.isin(np.arange(n), v).astype(np.float32) for k, v in labels.items()},
                           header="demo dataset: <id> <0-based class indices present>")
        bar.close()
        write_id_list(tmp / "train.txt", splits["train"])
        write_id_list(tmp / "train_aug.txt", splits["train"])  # the published scripts read train_aug
        write_id_list(tmp / "val.txt", splits["val"])
        ctx_lines = ["# <value in ContextMasks/*.png> <context name> <class it always comes with>",
                     "# 0 = no context; context pixels are background in the ground truth"]
        ctx_lines += [f"{v} {ctx} {cls}" for v, (ctx, cls) in CONTEXTS.items() if cls in settings.classes]
        atomic_write_text(tmp / "context.txt", "\n".join(ctx_lines) + "\n")
        atomic_write_text(tmp / "saliency_flaws.txt", "\n".join(flaw_lines) + "\n")
        info = dict(generator="tools/make_demo_dataset.py", version=GENERATOR_VERSION, seed=seed,
                    num_train=num_train, num_val=num_val, size=settings.size,
                    classes=list(settings.classes), ignore_border=settings.ignore_border,
                    miss_prob=settings.miss_prob, false_pos_prob=settings.false_pos_prob,
                    jpeg_quality=settings.jpeg_quality,
                    contexts={ctx: cls for ctx, cls in CONTEXTS.values() if cls in settings.classes})
        atomic_write_text(tmp / "dataset_info.json", json.dumps(info, indent=2) + "\n")
        # Swap in the finished folder; an existing one is moved aside first and deleted last.
        old = None
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while generating; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "dataset")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_saliency_flaws(path) -> Dict[str, List[str]]:
    """Read ``saliency_flaws.txt`` -> {id: ["missed=<class>", "false_blob", ...]}."""
    table: Dict[str, List[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#"):
            table[parts[0]] = parts[1:]
    return table


def read_context_names(path) -> Dict[int, Tuple[str, str]]:
    """Read ``context.txt`` -> {value: (context name, class name)}."""
    table = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            value, ctx, cls = line.split()
            table[int(value)] = (ctx, cls)
    return table


def count_context_errors(pred: np.ndarray, context: np.ndarray,
                         contexts: Dict[int, Tuple[str, str]], class_names: Sequence[str]
                         ) -> Dict[str, Tuple[int, int]]:
    """{context name: (pixels labelled as its class, context pixels)} for one pseudo-mask.

    ``pred`` holds label values (0 background, c+1 class c), ``context`` a ContextMasks PNG,
    ``contexts`` the table of :func:`read_context_names`, ``class_names`` the C foreground names.
    Summing the pairs over images gives the demo's "railroad labelled as train" rate."""
    out = {}
    for value, (ctx_name, cls) in contexts.items():
        region = context == value
        label = class_names.index(cls) + 1
        out[ctx_name] = (int((region & (pred == label)).sum()), int(region.sum()))
    return out


def _class_list(text: str) -> Tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in CLASS_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--classes must be distinct names from {','.join(CLASS_NAMES)}; got {text!r}")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Generate the synthetic demo dataset (VOC layout)", add_help=False)
    p.add_argument("--out", type=Path, default=Path("demo_data"),
                   help="dataset root to create (default demo_data)")
    p.add_argument("--num-train", "--num_train", type=int, default=1500,
                   help="number of training images (default 1500; the demo's tuned value)")
    p.add_argument("--num-val", "--num_val", type=int, default=300, help="number of val images (default 300)")
    p.add_argument("--size", type=int, default=96,
                   help="image side in pixels (default 96: the demo's small CNN trains 1,000 "
                        "iterations in about 4 minutes on one CPU thread)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--classes", type=_class_list, default=CLASS_NAMES,
                   help=f"comma-separated subset of {','.join(CLASS_NAMES)} (default all; order sets the indices)")
    p.add_argument("--ignore-border", "--ignore_border", type=int, default=1,
                   help="width of the 255 (ignore) ring inside object edges in the GT, like VOC (default 1; 0 = none)")
    p.add_argument("--miss-prob", "--miss_prob", type=float, default=0.08,
                   help="probability that the saliency misses a large part of an object (default 0.08)")
    p.add_argument("--false-pos-prob", "--false_pos_prob", type=float, default=0.3,
                   help="probability of one false-positive saliency blob per image (default 0.3)")
    p.add_argument("--jpeg-quality", "--jpeg_quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing dataset at --out (default: refuse)")
    return p


class DemoDataError(UserError):
    """A bad setting or an existing dataset; the message says what to do."""


def main(args) -> Path:
    if args.size < 32:
        raise DemoDataError(f"--size {args.size} is too small: use at least 32 pixels")
    if args.num_train < 1 or args.num_val < 0:
        raise DemoDataError("--num-train must be >= 1 and --num-val >= 0")
    settings = Settings(size=args.size, classes=tuple(args.classes), ignore_border=args.ignore_border,
                        miss_prob=args.miss_prob, false_pos_prob=args.false_pos_prob,
                        jpeg_quality=args.jpeg_quality)
    try:
        out = write_dataset(args.out, args.num_train, args.num_val, args.seed, settings,
                            overwrite=args.overwrite)
    except FileExistsError as e:
        raise DemoDataError(str(e)) from None
    logger.info("wrote %d train + %d val images to %s", args.num_train, args.num_val, out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
