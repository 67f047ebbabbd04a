"""Datasets shared by every entry point: classification (cls), classification with saliency (eps),
multi-scale inference and segmentation (image, mask).

Missing files: every dataset resolves its files once, at construction (cheap ``os.path`` checks,
no decoding). By default a missing image / saliency map / mask stops the run right there with a
``DataError`` that names the files and the fix. With ``skip_missing=True`` (the entry points'
``--skip-missing`` flag) those ids are dropped instead and the count is logged and shown in
``repr(dataset)``. Missing or empty image labels always stop the run: they mean the list and the
labels file disagree, which skipping would hide. Problems that need the pixels (corrupt files,
unsupported bit depths, a mask size different from the image's, a saliency map with another
aspect ratio than its image) are raised when the item is loaded; ``tools/check_dataset.py`` finds
all of them up front, and train.py checks the saliency maps before any compute
(``data.saliency.check_saliency_maps``).

Override contract of ``_BaseDataset``: a subclass sets ``needs_labels`` and implements
``_extra_files(img_id) -> {kind: Path}`` (files besides the image that must exist) and
``__getitem__``; the base class resolves ``self.ids``, ``self.image_paths``, ``self.extra_paths``
and ``self.labels``.

A method's extra sample entries (the head's ``sample_extras`` hook, network/heads.py): the
training datasets call ``sample_extras(SampleContext)`` after the published item is made and
append the dict it returns as the item's last element (the DataLoader stacks its tensors). With
no hook (``sample_extras=None``, the default) the items are the published ones, bit for bit.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from data.errors import DataError  # the entry points import it from here
from data.metadata import MetadataError
from data.pixels import image_to_8bit, saliency_to_8bit
from data.registry import DatasetInfo, dataset_root_of
from data.saliency import check_map_size
from data.transforms import (INFER_SCALES, ClsSalTrainTransform, ClsTrainTransform,
                             multiscale_arrays)
from utils.errors import examples

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# File readers with clear errors
# --------------------------------------------------------------------------------------------
def default_saliency_root(info: DatasetInfo, data_root) -> Path:
    """``<dataset root>/SALImages`` (the registry's saliency folder), used when none is given."""
    return dataset_root_of(data_root) / info.spec.saliency_dir


def saliency_path(saliency_root, img_id: str) -> Path:
    return Path(saliency_root) / f"{img_id}.png"


def _open(path: Path, what: str, fix: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a DataError."""
    try:
        img = Image.open(path)
        img.load()  # PIL decodes lazily; force it so truncated files fail here, with the name
        return img
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}; {fix}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read {what} {path} ({e}); the file is corrupt or not an image: "
                        f"re-extract it from the dataset archive or remove the id from the list") from None


def load_rgb(path) -> Image.Image:
    """An image as PIL RGB (published: ``Image.open(p).convert("RGB")``), read at its real bit
    depth: 16-bit grayscale as round(v / 257), other non-8-bit files refused (data/pixels.py)."""
    img = _open(Path(path), "image", "check --data_root (the folder with JPEGImages/ or the "
                                     "COCO split folders)")
    return image_to_8bit(img, path).convert("RGB")


def load_saliency(path, image_size, image_path=None, stretch: bool = False) -> Image.Image:
    """A saliency PNG in an 8-bit mode (the transform converts it to RGB as published; a 16-bit
    grayscale map comes back as 'L', round(v / 257)). Its size may differ from the image's when
    the aspect ratio is the same (the transform resizes it to the image, as published); another
    aspect ratio is a DataError unless ``stretch`` (--stretch-saliency; data/saliency.py)."""
    sal = _open(Path(path), "saliency map", "check --saliency_root (one <id>.png per image)")
    sal = saliency_to_8bit(sal, path)
    check_map_size(path, sal.size, image_size, stretch, image_path)
    return sal


def load_mask(path, image_size=None, image_path=None) -> np.ndarray:
    """A label PNG as uint8 (H, W) class indices (palette or grayscale PNG)."""
    img = _open(Path(path), "mask", "check the mask folder (SegmentationClassAug/ for VOC, "
                                    "SegmentationClass/<split>/ for COCO, or --mask-dir)")
    if img.mode not in ("P", "L"):
        raise DataError(f"mask {path} has mode {img.mode}; masks must be single-channel palette or "
                        f"grayscale PNGs whose pixel values are class indices (VOC colour PNGs "
                        f"must be converted to indices first)")
    mask = np.array(img, dtype=np.uint8)
    if image_size is not None and (mask.shape[1], mask.shape[0]) != tuple(image_size):
        raise DataError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                        f"{image_path or ''} is {image_size[0]}x{image_size[1]}; use the mask "
                        f"made for this image")
    return mask


def _image_problem(path) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """(why an image cannot be read as load_rgb reads it, or None; its (w, h) when it can).
    Header only for 8-bit files."""
    try:
        with Image.open(path) as img:
            image_to_8bit(img, path)
            return None, img.size
    except DataError as e:
        return str(e), None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"cannot read image {path} ({e})", None


def _mask_problem(path, image_path, image_size, num_classes: Optional[int],
                  ignore_label: int) -> Optional[str]:
    """Why a label mask cannot be trained on (mode, size and values, as load_mask and
    train_seg.check_labels would find in the middle of a run), or None."""
    try:
        mask = load_mask(path, image_size, image_path)
    except DataError as e:
        return str(e)
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_label)])
        if bad.size:
            return (f"mask {path} has values {bad[:5].tolist()} outside 0..{num_classes - 1} and "
                    f"{ignore_label} (ignore): made for another dataset, or a colour rendering?")
    return None


def check_files(ids: Sequence[str], image_paths: Sequence, mask_paths: Optional[Sequence] = None,
                *, num_classes: Optional[int] = None, ignore_label: int = 255,
                workers: int = 8) -> None:
    """Before any compute and before any output exists: every image opens with an exact 8-bit
    reading (its header; data/pixels.py) and, with ``mask_paths``, every mask is a
    single-channel PNG of its image's size whose values are classes (< ``num_classes``) or
    ``ignore_label`` (masks are decoded: they are small). The loaders would find the same
    problems only when the item comes up, hours into a run, after its folders were made.
    Raises one DataError listing the first problems and the fix."""
    def job(k):
        problem, size = _image_problem(image_paths[k])
        if problem is None and mask_paths is not None:
            problem = _mask_problem(mask_paths[k], image_paths[k], size, num_classes,
                                    ignore_label)
        return None if problem is None else f"{ids[k]}: {problem}"

    # Header reads wait on the disk, not the CPU: threads suffice.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = [p for p in pool.map(job, range(len(ids))) if p is not None]
    if problems:
        what = "image or mask" if mask_paths is not None else "image"
        raise DataError(f"{len(problems)} of {len(ids)} ids have an {what} that cannot be used "
                        f"({examples(problems)}); replace or fix these files, or remove their "
                        f"ids from the list (tools/check_dataset.py lists every problem)")


class _ImageLocator:
    """``info.image_path`` with a cache of the folder that held the previous image of the same
    split, so resolving 82k COCO ids costs about one stat each instead of several."""

    def __init__(self, info: DatasetInfo, data_root: Path):
        self.info, self.data_root = info, data_root
        self.folders: Dict[str, str] = {}

    def __call__(self, img_id: str) -> Path:
        split = img_id.rsplit("_", 1)[0]  # COCO_train2014 / VOC year: ids of one folder share it
        folder = self.folders.get(split)
        if folder is not None:
            cand = os.path.join(folder, img_id + ".jpg")
            if os.path.isfile(cand):
                return Path(cand)
        path = self.info.image_path(self.data_root, img_id)
        if path.is_file():
            self.folders[split] = str(path.parent)
        return path


# --------------------------------------------------------------------------------------------
# What a head's sample_extras hook sees
# --------------------------------------------------------------------------------------------
@dataclass
class SampleContext:
    """One training sample, as a head's ``sample_extras(ctx)`` hook sees it (in a loader
    worker): ``index`` in the dataset, ``id``, the decoded ``image`` (RGB PIL image, before any
    augmentation), its ``saliency`` map (PIL image, or None without saliency), the ``label``
    tensor (C,), the run's method ``hparams`` and the ``dataset`` (its ``info``, paths and
    ``transform``). ``view()`` draws another augmented view of the same image with the
    dataset's own transform and random stream: a tensor (3, crop, crop), or (image, saliency)
    with saliency."""

    index: int
    id: str
    image: Image.Image
    saliency: Optional[Image.Image]
    label: torch.Tensor
    hparams: Dict[str, Any]
    dataset: "_BaseDataset"

    def view(self):
        if self.saliency is None:
            return self.dataset.transform(self.image)
        return self.dataset.transform(self.image, self.saliency)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------
class _BaseDataset(Dataset):
    needs_labels = True
    # The head's hook (network/heads.py Head.sample_extras) and the method's hyper-parameters,
    # set by train.py; None = nothing extra
    sample_extras: Optional[Callable[[SampleContext], Dict[str, Any]]] = None
    sample_hparams: Dict[str, Any] = {}

    def __init__(self, info: DatasetInfo, data_root, ids: Union[Sequence[str], str, os.PathLike],
                 *, skip_missing: bool = False):
        self.info = info
        self.data_root = Path(data_root)
        if isinstance(ids, (str, os.PathLike)):
            ids = info.read_ids(ids)  # a split name ("train_aug") or a list file
        ids = list(ids)
        if not ids:
            raise DataError("the id list is empty; pass a non-empty list (e.g. metadata/voc12/train.txt)")
        self.num_listed = len(ids)
        self.ids: List[str] = []
        self.image_paths: List[Path] = []
        self.extra_paths: List[Dict[str, Path]] = []
        missing: List[str] = []
        find_image = _ImageLocator(info, self.data_root)
        for img_id in ids:
            files = {"image": find_image(img_id)}
            files.update(self._extra_files(img_id))
            absent = [f"{kind} {p}" for kind, p in files.items() if not os.path.isfile(p)]
            if absent:
                missing.append(f"{img_id}: " + ", ".join(absent))
                continue
            self.ids.append(img_id)
            self.image_paths.append(files.pop("image"))
            self.extra_paths.append(files)
        self.num_skipped = len(missing)
        if missing and not skip_missing:
            raise DataError(
                f"{len(missing)} of {len(ids)} listed ids have missing files (not found: "
                f"{examples(missing)}). Fix the data root / saliency root / mask folder "
                f"(tools/check_dataset.py prints a full report), or pass --skip-missing to "
                f"drop these ids")
        if missing:
            logger.warning("%s: skipped %d of %d ids with missing files (first: %s)",
                           type(self).__name__, len(missing), len(ids), examples(missing))
        if not self.ids:
            raise DataError(f"no listed id has its files under {self.data_root}: check the root")
        self.labels: Optional[np.ndarray] = self._collect_labels() if self.needs_labels else None

    def _extra_files(self, img_id: str) -> Dict[str, Path]:
        return {}

    def _collect_labels(self) -> np.ndarray:
        """(N, C) float32 labels of self.ids; every id must have a non-empty label."""
        _ = self.info.image_labels  # a missing or malformed file is one error, not one per id
        rows, problems = [], []
        for img_id in self.ids:
            try:
                rows.append(self.info.labels_for(img_id))
            except MetadataError as e:
                problems.append(str(e))
        if problems:
            raise DataError(f"{len(problems)} of {len(self.ids)} ids cannot be used: {problems[0]}"
                            + (f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""))
        return np.stack(rows).astype(np.float32)

    def label(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[index].copy())

    def _with_extras(self, item: tuple, index: int, image, saliency=None) -> tuple:
        """The item, plus the head's extra entries when it has the hook (after the published
        item is made, so the item's own random draws come first)."""
        if self.sample_extras is None:
            return item
        ctx = SampleContext(index=index, id=self.ids[index], image=image, saliency=saliency,
                            label=item[-1], hparams=dict(self.sample_hparams), dataset=self)
        extras = self.sample_extras(ctx)
        if not isinstance(extras, dict):
            raise TypeError(f"sample_extras must return a dict, got {type(extras).__name__}")
        return item + (extras,)

    def __len__(self) -> int:
        return len(self.ids)

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self):
        skipped = f", skipped={self.num_skipped}" if self.num_skipped else ""
        return (f"{type(self).__name__}(dataset={self.info.name!r}, size={len(self)}{skipped}, "
                f"root='{self.data_root}'{self._repr_extra()})")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def _check_resize(resize_size) -> tuple:
    resize_size = tuple(int(v) for v in resize_size)
    if len(resize_size) != 2:
        raise ValueError(f"resize_size needs two values (min_long max_long), got {resize_size}")
    return resize_size


class ClsDataset(_BaseDataset):
    """'cls' training data: ``(id, img float32 (3,crop,crop), label float32 (C,))``."""

    def __init__(self, info: DatasetInfo, data_root, ids, crop_size: int,
                 resize_size: Sequence[int] = (256, 512), *, skip_missing: bool = False,
                 transform=None, rng=None):
        super().__init__(info, data_root, ids, skip_missing=skip_missing)
        self.transform = transform if transform is not None else \
            ClsTrainTransform(crop_size, _check_resize(resize_size), rng=rng)

    def __getitem__(self, index: int):
        img = load_rgb(self.image_paths[index])
        return self._with_extras((self.ids[index], self.transform(img), self.label(index)),
                                 index, img)

    def _repr_extra(self):
        return f", transform={self.transform}"


class ClsSalDataset(_BaseDataset):
    """'eps' training data: ``(id, img (3,crop,crop), sal (1,crop,crop) in [0,1], label (C,))``.

    Saliency map = ``saliency_root/<id>.png``; ``saliency_root=None`` means
    ``<dataset root>/SALImages``. A map at another resolution than its image (same aspect ratio)
    is resized to the image, as published; one with another aspect ratio is a DataError naming
    the file unless ``stretch_saliency`` (--stretch-saliency, a deviation: stretched to the image).
    """

    def __init__(self, info: DatasetInfo, data_root, saliency_root, ids, crop_size: int,
                 resize_size: Sequence[int] = (256, 512), *, skip_missing: bool = False,
                 transform=None, rng=None, stretch_saliency: bool = False):
        self.saliency_root = Path(saliency_root) if saliency_root is not None \
            else default_saliency_root(info, data_root)
        self.stretch_saliency = bool(stretch_saliency)
        super().__init__(info, data_root, ids, skip_missing=skip_missing)
        self.transform = transform if transform is not None else \
            ClsSalTrainTransform(crop_size, _check_resize(resize_size), rng=rng,
                                 stretch_saliency=self.stretch_saliency)

    def _extra_files(self, img_id):
        return {"saliency": saliency_path(self.saliency_root, img_id)}

    def __getitem__(self, index: int):
        img_path = self.image_paths[index]
        img = load_rgb(img_path)
        sal = load_saliency(self.extra_paths[index]["saliency"], img.size, img_path,
                            stretch=self.stretch_saliency)
        img_t, sal_t = self.transform(img, sal)
        return self._with_extras((self.ids[index], img_t, sal_t, self.label(index)), index, img, sal)

    def _repr_extra(self):
        stretch = ", stretch_saliency=True" if self.stretch_saliency else ""
        return f", saliency_root='{self.saliency_root}'{stretch}, transform={self.transform}"


class InferDataset(_BaseDataset):
    """Multi-scale CAM inference inputs (as EPS infer.py preprocess; docs/inference.md).

    Item: ``{"id", "images": [float32 (3, round(h*s), round(w*s)) per scale, normalized, NOT
    flipped], "label": float32 (C,), "size": (H, W)}`` plus ``"image"`` (uint8 H×W×3 RGB) when
    ``return_image`` (for CRF / overlays). Sizes differ per image: use ``batch_size=None`` or 1.
    ``with_labels=False`` (infer.py --labels predicted) reads no image labels: "label" is None.
    """

    def __init__(self, info: DatasetInfo, data_root, ids, scales: Sequence[float] = INFER_SCALES,
                 *, skip_missing: bool = False, return_image: bool = False,
                 with_labels: bool = True):
        self.needs_labels = bool(with_labels)
        super().__init__(info, data_root, ids, skip_missing=skip_missing)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        self.return_image = return_image

    def __getitem__(self, index: int):
        img = load_rgb(self.image_paths[index])
        item = {"id": self.ids[index],
                "images": [torch.from_numpy(a) for a in multiscale_arrays(img, self.scales)],
                "label": self.label(index) if self.labels is not None else None,
                "size": (img.size[1], img.size[0])}
        if self.return_image:
            item["image"] = np.asarray(img).copy()
        return item

    def _repr_extra(self):
        return f", scales={self.scales}"


class SegDataset(_BaseDataset):
    """Images with their label masks: ``(id, image uint8 (H,W,3) RGB, mask uint8 (H,W))``.

    Mask = ``mask_dir/<id>.png`` or, without ``mask_dir``, the dataset's GT path
    (SegmentationClassAug / SegmentationClass). ``transform(image, mask) -> (image, mask)`` is a
    hook for training pipelines. Image labels are not needed.
    """
    needs_labels = False

    def __init__(self, info: DatasetInfo, data_root, ids, mask_dir=None, transform=None,
                 *, skip_missing: bool = False):
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        super().__init__(info, data_root, ids, skip_missing=skip_missing)
        self.transform = transform

    def _extra_files(self, img_id):
        if self.mask_dir is not None:
            return {"mask": self.mask_dir / f"{img_id}.png"}
        # GT folders sit beside JPEGImages, also when data_root is the JPEGImages folder itself.
        return {"mask": self.info.gt_path(dataset_root_of(self.data_root), img_id)}

    def __getitem__(self, index: int):
        img_path = self.image_paths[index]
        img = load_rgb(img_path)
        mask = load_mask(self.extra_paths[index]["mask"], img.size, img_path)
        image = np.asarray(img).copy()
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return self.ids[index], image, mask

    def _repr_extra(self):
        where = f"'{self.mask_dir}'" if self.mask_dir is not None else "GT folder"
        return f", masks={where}"
