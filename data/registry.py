"""The dataset registry: one entry per dataset, mapping a name to its metadata and defaults.

Adding a dataset is one entry in ``DATASETS``. A user's own dataset in the VOC layout needs no
entry: ``--dataset custom`` reads ``labels.txt``, ``image_labels.txt`` and the split lists from
the dataset root (or from ``--metadata-dir``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.errors import DataError
from data.metadata import MetadataError, read_class_names, read_id_list, read_image_labels

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
METADATA_ROOT = PACKAGE_ROOT / "metadata"

# The published training recipes shared by every method: the one place they live (the pipeline
# scripts pass only what a user overrides). Keys match train.py flag names (EPS
# script/voc12_*.sh, coco_*.sh and main.py defaults); infer_list is the list the published
# scripts score; seg_list / seg_eval_list are the DeepLab stage's train and val lists. A method's
# own per-dataset values (EPS --tau / --lam) are the head's: network/heads.py, HParam.
VOC12_TRAIN_DEFAULTS = dict(train_list="train_aug", infer_list="train", crop_size=448,
                            resize_size=(256, 512), batch_size=8, max_iters=20000, lr=0.01,
                            wt_dec=5e-4, seg_list="train_aug", seg_eval_list="val")
COCO_TRAIN_DEFAULTS = dict(train_list="train", infer_list="train", crop_size=321,
                           resize_size=(256, 448), batch_size=16, max_iters=256500, lr=0.01,
                           wt_dec=5e-4, seg_list="train", seg_eval_list="val")
# Published mIoU (%): pseudo-masks on the infer list per head (EPS README "Train(mIoU)": the released
# checkpoints, not the paper's networks, EPS issue #10), and the DeepLab-v2 ResNet-101 val mIoU on
# EPS pseudo-masks (the paper, as PapersWithCode records it; with or without CRF is not known). No
# COCO DeepLab anchor: PapersWithCode's 35.7 is unchecked (docs/pipelines.md "Expected numbers").
VOC12_PUBLISHED = {"cls": 47.05, "eps": 69.22, "deeplab_eps": 70.9}
COCO_PUBLISHED = {"cls": 31.23, "eps": 37.15}


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset layout.

    image_dirs / gt_dirs are sub-folders of the dataset root searched in order for
    ``<id>.jpg`` / ``<id>.png``; ``{split}`` is replaced by the id's split prefix for COCO ids
    (``COCO_train2014_...`` -> ``train2014``). The root itself is searched first, so the published
    ``--data_root .../JPEGImages`` style also works.
    """
    name: str
    metadata_dir: Optional[Path]
    image_dirs: Tuple[str, ...]
    gt_dirs: Tuple[str, ...]
    saliency_dir: str
    train_defaults: Dict = field(default_factory=dict)
    published_miou: Dict[str, float] = field(default_factory=dict)


DATASETS: Dict[str, DatasetSpec] = {
    "voc12": DatasetSpec(
        name="voc12", metadata_dir=METADATA_ROOT / "voc12",
        image_dirs=("JPEGImages",), gt_dirs=("SegmentationClassAug", "SegmentationClass"),
        saliency_dir="SALImages", train_defaults=VOC12_TRAIN_DEFAULTS,
        published_miou=VOC12_PUBLISHED),
    "coco": DatasetSpec(
        name="coco", metadata_dir=METADATA_ROOT / "coco",
        image_dirs=("{split}", "images/{split}"),
        gt_dirs=("SegmentationClass/{split}", "SegmentationClass"),
        saliency_dir="SALImages", train_defaults=COCO_TRAIN_DEFAULTS,
        published_miou=COCO_PUBLISHED),
    # A user's dataset in the VOC layout; metadata comes from the root (or --metadata-dir).
    "custom": DatasetSpec(
        name="custom", metadata_dir=None,
        image_dirs=("JPEGImages",), gt_dirs=("SegmentationClassAug", "SegmentationClass"),
        saliency_dir="SALImages", train_defaults=VOC12_TRAIN_DEFAULTS),
}


def _id_split(img_id: str) -> str:
    # COCO_train2014_000000000009 -> train2014
    parts = img_id.split("_")
    return parts[1] if len(parts) >= 3 and parts[0] == "COCO" else ""


def dataset_root_of(path) -> Path:
    """The dataset root for a path that is either the root or its image folder (JPEGImages)."""
    path = Path(path)
    return path.parent if path.name == "JPEGImages" else path


class DatasetFiles:
    """A dataset spec bound to a metadata folder, without its class metadata: id lists and file
    paths only. Tools that need no classes (tools/make_saliency.py) use it on a root that has
    no labels.txt yet; :class:`DatasetInfo` adds the classes and image labels."""

    def __init__(self, spec: DatasetSpec, metadata_dir: Path):
        self.spec = spec
        self.name = spec.name
        self.metadata_dir = Path(metadata_dir)

    def __repr__(self):
        return f"DatasetFiles(name={self.name!r}, metadata_dir='{self.metadata_dir}')"

    @property
    def train_defaults(self) -> Dict:
        return dict(self.spec.train_defaults)

    def list_path(self, name_or_path) -> Path:
        """Resolve a list given as a path (absolute, relative to cwd or to the repository, e.g. the
        published ``metadata/voc12/train_aug.txt``) or as a split name (``train_aug``)."""
        p = Path(name_or_path)
        for cand in (p, PACKAGE_ROOT / p, self.metadata_dir / p, self.metadata_dir / f"{p}.txt"):
            if cand.is_file():
                return cand
        raise MetadataError(
            f"id list {name_or_path!r} not found (looked in the working directory, "
            f"{PACKAGE_ROOT} and {self.metadata_dir}); pass a path or a split name such as 'train'")

    def read_ids(self, name_or_path, *, keep_duplicates: bool = False) -> List[str]:
        """The ids of a list, each once (a repeated id is dropped with a warning; see
        data.metadata.read_id_list). ``keep_duplicates=True`` is for checkers that report them."""
        return read_id_list(self.list_path(name_or_path), keep_duplicates=keep_duplicates)

    def _find(self, root, img_id: str, subdirs: Sequence[str], ext: str) -> Path:
        root = Path(root)
        base = dataset_root_of(root)  # the published style passes .../JPEGImages itself
        split = _id_split(img_id)
        cands = [root / f"{img_id}{ext}"] + [base / d.format(split=split) / f"{img_id}{ext}"
                                             for d in subdirs if split or "{split}" not in d]
        for c in cands:
            if c.is_file():
                return c
        return cands[1] if len(cands) > 1 else cands[0]  # the canonical place, for error messages

    def image_path(self, root, img_id: str) -> Path:
        """Path of ``<id>.jpg`` under the dataset root or its image folder (may not exist)."""
        return self._find(root, img_id, self.spec.image_dirs, ".jpg")

    def gt_path(self, root, img_id: str) -> Path:
        """Path of the ground-truth mask ``<id>.png`` (may not exist)."""
        return self._find(root, img_id, self.spec.gt_dirs, ".png")


class DatasetInfo(DatasetFiles):
    """A dataset spec bound to a metadata folder: class names, id lists, image labels, file paths."""

    def __init__(self, spec: DatasetSpec, metadata_dir: Path):
        super().__init__(spec, metadata_dir)
        labels = self.metadata_dir / "labels.txt"
        if not labels.is_file():
            where = ("a --dataset custom root holds labels.txt, image_labels.txt and the split "
                     "lists (docs/data.md); check the data root" if spec.metadata_dir is None
                     else f"restore the repository's metadata/{spec.name}")
            raise MetadataError(f"{labels}: file not found; {where}, or pass --metadata-dir")
        self.label_names: List[str] = read_class_names(labels)
        if len(self.label_names) < 2:
            raise MetadataError(f"{self.metadata_dir / 'labels.txt'}: need background plus at "
                                f"least one class; add a line '1 <name>' for each class")

    def __repr__(self):
        return (f"DatasetInfo(name={self.name!r}, num_classes={self.num_classes}, "
                f"metadata_dir='{self.metadata_dir}')")

    @property
    def class_names(self) -> List[str]:
        """Foreground class names; index c is class c of the image labels and CAM channel c."""
        return self.label_names[1:]

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (20 for VOC, 80 for COCO)."""
        return len(self.label_names) - 1

    @functools.cached_property
    def image_labels(self) -> Dict[str, np.ndarray]:
        """{id: float32 (C,) multi-hot}, read once from ``image_labels.txt``."""
        path = self.metadata_dir / "image_labels.txt"
        if not path.is_file():
            raise MetadataError(f"{path}: file not found; make it with tools/make_cls_labels.py "
                                f"(docs/data.md), or pass --metadata-dir")
        return read_image_labels(path, self.num_classes)

    def labels_for(self, img_id: str) -> np.ndarray:
        """Image-level label of one id; a clear error if it is missing or empty."""
        try:
            vec = self.image_labels[img_id]
        except KeyError:
            raise MetadataError(
                f"{self.metadata_dir / 'image_labels.txt'}: no image labels for id {img_id!r}; "
                f"regenerate the labels (tools/make_cls_labels.py) or remove the id from the list") from None
        if not vec.any():
            raise MetadataError(
                f"{self.metadata_dir / 'image_labels.txt'}: image {img_id!r} has no class; "
                f"weakly supervised training needs at least one class per image: remove it from the list")
        return vec


def check_data_root(path, flag: str) -> None:
    """A dataset root that is not a folder, as one line naming the flag (else the first error
    would be a missing labels.txt, or 10,582 missing images)."""
    if path is not None and not Path(path).is_dir():
        what = "a file, not a folder" if Path(path).exists() else "no such folder"
        raise DataError(f"{flag} {path}: {what}; pass the dataset root (the folder holding "
                        f"JPEGImages/, or train2014/ for COCO)")


def get_dataset(name: str, metadata_dir=None, data_root=None) -> DatasetInfo:
    """Look up a dataset by name. ``metadata_dir`` overrides where its text metadata lives; for
    ``custom`` it defaults to the dataset root (the folder that holds JPEGImages)."""
    if name not in DATASETS:
        raise MetadataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    if metadata_dir is None:
        metadata_dir = spec.metadata_dir
    if metadata_dir is None:
        if data_root is None:
            raise MetadataError(f"--dataset {name} needs --metadata-dir or a data root that holds "
                                f"labels.txt, image_labels.txt and the split lists (docs/data.md)")
        metadata_dir = dataset_root_of(data_root)
        if not (Path(metadata_dir) / "labels.txt").is_file():
            # The most common slip with a custom dataset: point it at a folder without metadata.
            raise MetadataError(
                f"--dataset {name} reads labels.txt, image_labels.txt and the id lists from the "
                f"dataset root or --metadata-dir, and {Path(metadata_dir) / 'labels.txt'} does not "
                f"exist: {'the dataset root does not exist; check the path' if not Path(metadata_dir).is_dir() else 'write them (docs/data.md, your own dataset) or pass --metadata-dir'}")
    return DatasetInfo(spec, Path(metadata_dir))


def get_dataset_files(name: str, metadata_dir=None, data_root=None) -> DatasetFiles:
    """The id lists and file paths of a dataset, without reading its class metadata (a custom
    root needs no labels.txt for this): ``metadata_dir``, else the registry's folder, else (for
    ``custom``) the dataset root."""
    if name not in DATASETS:
        raise MetadataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    folder = metadata_dir if metadata_dir is not None else spec.metadata_dir
    if folder is None:
        if data_root is None:
            raise MetadataError(f"--dataset {name} needs --metadata-dir or a data root that holds "
                                f"the split lists (docs/data.md)")
        folder = dataset_root_of(data_root)
    return DatasetFiles(spec, Path(folder))
