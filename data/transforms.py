"""Image transforms of the published EPS / PSA pipeline (EPS util/imutils.py, metadata/dataset.py,
module/dataloader.py get_dataloader, infer.py preprocess; docs/data.md, docs/inference.md).

Every random decision is drawn from an ``rng`` object with Python ``random``'s interface
(``randint``, ``randrange``, ``random``); the default (``rng=None``) is the ``random`` module
itself, as in the published code, which PyTorch's DataLoader re-seeds in every worker (a
``random.Random`` instance would be copied into each worker with the same state: tests only). Tests pass a
``random.Random(seed)`` or a stub to pin crop offsets. Colour jitter is torchvision's and draws from
the torch RNG, exactly as published.

The deterministic pieces (``resize_long_size``, ``crop_box``, ``crop_with_box`` ...) are small pure
functions so that each published rule can be tested on its own.
"""
from __future__ import annotations

import random
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from data.errors import DataError
from data.saliency import OTHER_ASPECT, size_kind

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL.Image.CUBIC (used by the published code) was removed in Pillow 10; BICUBIC is the same filter.
RESAMPLE = Image.BICUBIC

# Sentinel for "use the published ColorJitter" (None means no jitter).
DEFAULT = object()

# Multi-scale inference scales of EPS infer.py (``scales`` in its __main__; docs/inference.md).
INFER_SCALES = (0.5, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------
def resize_long_size(size: Tuple[int, int], target_long: int) -> Tuple[int, int]:
    """(w, h) -> (w', h') with the longer side = target_long; published rounding rule.

    The branch is ``w < h`` (portrait), so a square image takes the landscape branch; the other
    side is ``int(round(...))`` with Python's half-to-even round on the float ratio.
    """
    w, h = size
    if w < h:
        return int(round(w * target_long / h)), target_long
    return target_long, int(round(h * target_long / w))


def resize_long(img: Image.Image, target_long: int) -> Image.Image:
    """Resize a PIL image so that its longer side is ``target_long`` (bicubic, 'image' mode)."""
    return img.resize(resize_long_size(img.size, target_long), resample=RESAMPLE)


class RandomResizeLong:
    """Resize the longer side to ``random.randint(min_long, max_long)`` (both ends inclusive)."""

    def __init__(self, min_long: int, max_long: int, rng=None):
        if not 0 < min_long <= max_long:
            raise ValueError(f"resize range must satisfy 0 < min <= max, got ({min_long}, {max_long})")
        self.min_long, self.max_long = int(min_long), int(max_long)
        self.rng = rng  # None = the ``random`` module (kept unresolved: modules do not pickle)

    def draw(self) -> int:
        return (self.rng if self.rng is not None else random).randint(self.min_long, self.max_long)

    def __call__(self, img: Image.Image, target_long: Optional[int] = None) -> Image.Image:
        return resize_long(img, self.draw() if target_long is None else target_long)

    def __repr__(self):
        return f"RandomResizeLong({self.min_long}, {self.max_long})"


def scaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
    """(w, h) -> (round(w*s), round(h*s)) with Python's half-to-even round (EPS infer.py)."""
    w, h = size
    return round(w * scale), round(h * scale)


# --------------------------------------------------------------------------------------------
# Flip, colour, normalization, layout
# --------------------------------------------------------------------------------------------
def draw_flip(rng=None) -> bool:
    """A fair coin for horizontal flips (the eps dataset flips when ``random.random() > 0.5``)."""
    return (rng if rng is not None else random).random() > 0.5


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


def default_color_jitter():
    """torchvision ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1), as
    published. torchvision is imported here, not at the top: importing it costs about 2 s (it
    pulls in torch._dynamo), which infer.py, evaluate.py and the tools never need."""
    from torchvision import transforms as T

    return T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)


def normalize(img, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 RGB (HWC array or PIL image) -> float32 HWC ``(x/255 - mean)/std``.

    Computed in float64 and cast once, like the published per-channel code, so values match
    it bit for bit.
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"normalize expects an RGB image (H, W, 3), got shape {arr.shape}")
    out = (arr / 255.0 - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return out.astype(np.float32)


def hwc_to_chw(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))


# --------------------------------------------------------------------------------------------
# Random crop with zero padding (psa imutils.RandomCrop / EPS random_crop_with_saliency)
# --------------------------------------------------------------------------------------------
class CropBox(NamedTuple):
    """Where a crop window lands: ``container[cont_top:cont_top+ch, cont_left:cont_left+cw] =
    image[img_top:img_top+ch, img_left:img_left+cw]``."""
    cont_top: int
    cont_left: int
    img_top: int
    img_left: int
    ch: int
    cw: int


def axis_offsets(size: int, crop: int, rng=None) -> Tuple[int, int]:
    """(container offset, image offset) along one axis.

    If the image is larger than the crop, a random window of the image goes to container
    offset 0; otherwise (including equal sizes) the whole image axis lands at a random offset
    inside the zero-filled container: it is NOT placed top-left.
    """
    rng = rng if rng is not None else random
    space = size - crop
    if space > 0:
        return 0, rng.randrange(space + 1)
    return rng.randrange(-space + 1), 0


def crop_box(height: int, width: int, crop: int, rng=None) -> CropBox:
    """Draw a crop box; the width offset is drawn before the height offset, as published."""
    cont_left, img_left = axis_offsets(width, crop, rng)
    cont_top, img_top = axis_offsets(height, crop, rng)
    return CropBox(cont_top, cont_left, img_top, img_left, min(crop, height), min(crop, width))


def crop_with_box(arr: np.ndarray, crop: int, box: CropBox) -> np.ndarray:
    """Apply a crop box to an HWC array; the result is a float32 (crop, crop, C) container that
    is zero where no image pixel lands."""
    if arr.ndim != 3:
        raise ValueError(f"crop expects an HWC array, got shape {arr.shape}")
    out = np.zeros((crop, crop, arr.shape[2]), np.float32)
    out[box.cont_top:box.cont_top + box.ch, box.cont_left:box.cont_left + box.cw] = \
        arr[box.img_top:box.img_top + box.ch, box.img_left:box.img_left + box.cw]
    return out


def random_crop(arrays: Sequence[np.ndarray], crop: int, rng=None) -> List[np.ndarray]:
    """Crop several HWC arrays of the same height and width with one random box."""
    h, w = arrays[0].shape[:2]
    for a in arrays[1:]:
        if a.shape[:2] != (h, w):
            raise ValueError(f"joint crop needs equal sizes, got {arrays[0].shape[:2]} and {a.shape[:2]}")
    box = crop_box(h, w, crop, rng)
    return [crop_with_box(a, crop, box) for a in arrays]


# --------------------------------------------------------------------------------------------
# Composed training transforms
# --------------------------------------------------------------------------------------------
class _TrainTransform:
    """Shared set-up of the training transforms: random resize-long, colour jitter, crop size."""

    def __init__(self, crop_size: int, resize_long: Sequence[int] = (256, 512),
                 color_jitter: Optional[Callable] = DEFAULT, rng=None):
        self.rng = rng  # None = the ``random`` module, resolved at call time so workers can pickle us
        self.resize = RandomResizeLong(resize_long[0], resize_long[1], rng=self.rng)
        self.crop_size = int(crop_size)
        self.color_jitter = default_color_jitter() if color_jitter is DEFAULT else color_jitter


class ClsTrainTransform(_TrainTransform):
    """'cls' training transform: resize-long -> hflip (p=0.5) -> jitter -> normalize -> crop -> CHW.

    Returns a float32 tensor (3, crop, crop). ``color_jitter=None`` disables jitter (tests only).
    """

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.resize(img)
        # Published: torchvision RandomHorizontalFlip (torch RNG); same p=0.5, drawn from rng here
        # so that one seedable source controls the geometry.
        if draw_flip(self.rng):
            img = hflip(img)
        if self.color_jitter is not None:
            img = self.color_jitter(img)
        arr = normalize(img)
        (arr,) = random_crop([arr], self.crop_size, self.rng)
        return torch.from_numpy(hwc_to_chw(arr))

    def __repr__(self):
        return (f"ClsTrainTransform(resize={self.resize}, flip=0.5, jitter={self.color_jitter}, "
                f"crop={self.crop_size})")


class ClsSalTrainTransform(_TrainTransform):
    """'eps' joint transform of an image and its saliency map (EPS metadata/dataset.py
    ClassificationDatasetWithSaliency.transform_with_mask).

    One target_long for both (both bicubic) -> joint hflip -> jitter (image only) -> normalize the
    image, saliency uint8/255 -> joint crop with the same box (both zero-padded) -> CHW ->
    saliency = mean over its 3 RGB channels. Returns (img (3,crop,crop), sal (1,crop,crop)) float32.

    The map is resized (RGB, bicubic) to the image's resized size. EPS resizes it from its own
    size to the same long side; for a map of the image's size both are the same call, bit for bit,
    and for a map at another resolution with the image's aspect ratio they agree while this one
    keeps the two aligned (docs/data.md). A map with another aspect ratio is a DataError unless
    ``stretch_saliency`` (--stretch-saliency: stretched to the image, a deviation).
    """

    def __init__(self, crop_size: int, resize_long: Sequence[int] = (256, 512),
                 color_jitter: Optional[Callable] = DEFAULT, rng=None,
                 stretch_saliency: bool = False):
        super().__init__(crop_size, resize_long, color_jitter, rng)
        self.stretch_saliency = bool(stretch_saliency)

    def __call__(self, img: Image.Image, sal: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.stretch_saliency and size_kind(img.size, sal.size) == OTHER_ASPECT:
            # EPS would misalign such a map; the datasets name the file before it gets here.
            raise DataError(f"saliency map of size {sal.size} has another aspect ratio than its "
                            f"image {img.size}: regenerate it from the image, or stretch it with "
                            f"--stretch-saliency (a deviation from the published code)")
        target_long = self.resize.draw()
        img = resize_long(img, target_long)
        sal = sal.convert("RGB").resize(img.size, resample=RESAMPLE)
        if draw_flip(self.rng):
            img, sal = hflip(img), hflip(sal)
        if self.color_jitter is not None:
            img = self.color_jitter(img)
        img_arr = normalize(img)
        sal_arr = np.asarray(sal) / 255.0  # float64 HWC, as published
        img_arr, sal_arr = random_crop([img_arr, sal_arr], self.crop_size, self.rng)
        sal_chw = hwc_to_chw(sal_arr).mean(axis=0, keepdims=True)
        return torch.from_numpy(hwc_to_chw(img_arr)), torch.from_numpy(np.ascontiguousarray(sal_chw))

    def __repr__(self):
        stretch = ", stretch_saliency=True" if self.stretch_saliency else ""
        return (f"ClsSalTrainTransform(resize={self.resize}, joint flip=0.5, jitter(image)="
                f"{self.color_jitter}, crop={self.crop_size}{stretch})")


def multiscale_arrays(img: Image.Image, scales: Sequence[float] = INFER_SCALES) -> List[np.ndarray]:
    """Inference inputs: for each scale a normalized float32 CHW array of the bicubic-resized
    image (sizes from ``scaled_size``). Flipped copies are left to the consumer."""
    out = []
    for s in scales:
        size = scaled_size(img.size, s)
        # PIL returns an identical copy when the size does not change (scale 1.0).
        out.append(hwc_to_chw(normalize(img.resize(size, resample=RESAMPLE))))
    return out
