"""DeepLab-v2 input pipeline for the segmentation stage (deeplab-pytorch libs/datasets/base.py
_BaseDataset._augmentation, libs/datasets/voc.py VOCAug; docs/segmentation.md).

Different from the EPS classification pipeline on purpose (docs/segmentation.md): the image is BGR
float32 in 0..255 minus the Caffe mean (no std division), the scale comes from a *discrete* set,
the image is resized with cv2 INTER_LINEAR and the label with PIL NEAREST, both are padded
bottom/right to the crop (image with the mean -> 0 after subtraction, label with 255 = ignore),
then a random crop and a horizontal flip.

Transforms take the (uint8 RGB HxWx3 image, uint8 HxW mask) pair that ``data.datasets.SegDataset``
yields and return (float32 CHW array, int64 HxW array).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

# Caffe ImageNet mean in BGR order (deeplab-pytorch IMAGE.MEAN: R 122.675, G 116.669, B 104.008).
MEAN_BGR = (104.008, 116.669, 122.675)
TRAIN_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
CROP_SIZE = 321
IGNORE_LABEL = 255


def rgb_to_bgr_float(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H,W,3) -> float32 BGR, what cv2.imread(...).astype(np.float32) gives."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H,W,3), got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, ::-1], dtype=np.float32)


def scaled_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    """(int(h*s), int(w*s)): truncation, as published."""
    return int(h * scale), int(w * scale)


def resize_pair(image_bgr: np.ndarray, label: np.ndarray, scale: float):
    """Image cv2 INTER_LINEAR, label PIL NEAREST, both to scaled_size."""
    h, w = scaled_size(*label.shape, scale)
    if (h, w) == label.shape:
        return image_bgr, label
    if h < 1 or w < 1:
        raise ValueError(f"scale {scale} shrinks a {label.shape} image to nothing")
    image_bgr = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    label = np.asarray(Image.fromarray(label).resize((w, h), resample=Image.NEAREST))
    return image_bgr, label


def pad_to(image_bgr: np.ndarray, label: np.ndarray, size: int,
           mean_bgr: Sequence[float] = MEAN_BGR, ignore_label: int = IGNORE_LABEL):
    """Pad bottom/right up to ``size`` (image with the mean colour, label with ignore)."""
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return image_bgr, label
    img = np.empty((h + ph, w + pw, 3), np.float32)
    img[...] = np.asarray(mean_bgr, np.float32)
    img[:h, :w] = image_bgr
    lab = np.full((h + ph, w + pw), ignore_label, label.dtype)
    lab[:h, :w] = label
    return img, lab


def to_chw(image_bgr: np.ndarray, mean_bgr: Sequence[float] = MEAN_BGR) -> np.ndarray:
    """Subtract the BGR mean (no std division) and move channels first."""
    return np.ascontiguousarray((image_bgr - np.asarray(mean_bgr, np.float32)).transpose(2, 0, 1))


class SegTrainTransform:
    """deeplab-pytorch training augmentation (``_augmentation`` of its VOC dataset).

    1. RGB -> BGR float32; 2. scale ~ uniform choice of ``scales``; 3. resize (image linear,
    label nearest); 4. pad bottom/right to ``crop_size``; 5. random crop; 6. hflip p=0.5;
    7. subtract the mean, CHW. Randomness comes from ``rng`` (a random.Random) or the global
    ``random`` module, which the DataLoader seeds per worker."""

    def __init__(self, crop_size: int = CROP_SIZE, scales: Sequence[float] = TRAIN_SCALES,
                 mean_bgr: Sequence[float] = MEAN_BGR, ignore_label: int = IGNORE_LABEL,
                 flip: bool = True, rng: Optional[random.Random] = None):
        if crop_size < 1 or not scales:
            raise ValueError("crop_size must be positive and scales non-empty")
        self.crop_size = int(crop_size)
        self.scales = tuple(float(s) for s in scales)
        self.mean_bgr = tuple(float(m) for m in mean_bgr)
        self.ignore_label = int(ignore_label)
        self.flip = flip
        self.rng = rng or random

    def __repr__(self):
        return (f"SegTrainTransform(crop={self.crop_size}, scales={self.scales}, "
                f"mean_bgr={self.mean_bgr}, flip={self.flip})")

    def __call__(self, image: np.ndarray, mask: np.ndarray):
        mask = np.asarray(mask, dtype=np.uint8)
        if mask.shape != np.asarray(image).shape[:2]:
            raise ValueError(f"image {np.asarray(image).shape[:2]} and mask {mask.shape} sizes differ")
        img = rgb_to_bgr_float(image)
        img, lab = resize_pair(img, mask, self.rng.choice(self.scales))
        img, lab = pad_to(img, lab, self.crop_size, self.mean_bgr, self.ignore_label)
        h, w = lab.shape
        y = self.rng.randint(0, h - self.crop_size)
        x = self.rng.randint(0, w - self.crop_size)
        img = img[y:y + self.crop_size, x:x + self.crop_size]
        lab = lab[y:y + self.crop_size, x:x + self.crop_size]
        if self.flip and self.rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return to_chw(img, self.mean_bgr), np.ascontiguousarray(lab, dtype=np.int64)


class SegEvalTransform:
    """Full image, no resize or padding (deeplab-pytorch test): BGR minus mean, CHW."""

    def __init__(self, mean_bgr: Sequence[float] = MEAN_BGR):
        self.mean_bgr = tuple(float(m) for m in mean_bgr)

    def __repr__(self):
        return f"SegEvalTransform(mean_bgr={self.mean_bgr})"

    def __call__(self, image: np.ndarray, mask: np.ndarray):
        return (to_chw(rgb_to_bgr_float(image), self.mean_bgr),
                np.ascontiguousarray(mask, dtype=np.int64))
