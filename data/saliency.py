"""Saliency maps whose size differs from their image's (docs/data.md, "Saliency maps at another size").

EPS (metadata/dataset.py, ClassificationDatasetWithSaliency) draws one target long side L and
resizes the image and the saliency map EACH FROM ITS OWN SIZE to long side L, then flips and crops
both with the same offsets. So:

* a map of the image's size: exact, and what ``ClsSalTrainTransform`` does bit for bit;
* the same picture at another resolution (same aspect ratio up to rounding, ``same_aspect_ratio``):
  the published resize equals resizing the map straight to the image's resized size, which is what
  ``ClsSalTrainTransform`` does; such maps are accepted and counted;
* another aspect ratio: the published code quietly misaligns map and image. Such maps stop the run
  before any compute unless the user asks to stretch them to their image (``--stretch-saliency``,
  a deviation from the published code).

Torch-free (PIL and numpy), so tools/check_dataset.py applies the same rule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from data.errors import DataError
from data.pixels import image_to_8bit, is_sixteen_bit, saliency_to_8bit
from utils.errors import examples

logger = logging.getLogger(__name__)

SAME, RESCALED, OTHER_ASPECT = "same size", "other resolution", "other aspect ratio"

STRETCH_FIX = ("regenerate these maps from their images, or pass --stretch-saliency to stretch "
               "each to its image (a deviation from the published code)")


def same_aspect_ratio(a: Tuple[int, int], b: Tuple[int, int]) -> bool:
    """Whether two (w, h) sizes are one picture at two resolutions, up to rounding.

    Rule: scale the larger of the two (the one holding the longest side of all four) without
    rounding so that its longest side equals the same side of the other; its other side must
    then be within one pixel of the other size's. The pixel is counted at the lower resolution,
    where the rounding happened: a map made at a quarter of a 500x374 image's resolution is
    125x94 (93.5 rounds to 94), which is 2 px off when scaled back up, yet exactly a rescaled copy.
    In integers (no float error): ``|wa*hb - ha*wb| <= max(wa, ha, wb, hb)``.
    """
    (wa, ha), (wb, hb) = a, b
    return abs(wa * hb - ha * wb) <= max(wa, ha, wb, hb)


def size_kind(image_size: Tuple[int, int], map_size: Tuple[int, int]) -> str:
    """SAME, RESCALED (another resolution, same aspect ratio) or OTHER_ASPECT."""
    image_size, map_size = tuple(image_size), tuple(map_size)
    if image_size == map_size:
        return SAME
    return RESCALED if same_aspect_ratio(image_size, map_size) else OTHER_ASPECT


def check_map_size(path, map_size, image_size, stretch: bool, image_path=None) -> str:
    """``size_kind`` of one map; a ``DataError`` naming the file for another aspect ratio unless
    ``stretch`` (the per-item check of the datasets, behind the run's pre-check)."""
    kind = size_kind(image_size, map_size)
    if kind == OTHER_ASPECT and not stretch:
        raise DataError(
            f"saliency map {path} is {map_size[0]}x{map_size[1]} (WxH) but its image "
            f"{image_path or ''} is {image_size[0]}x{image_size[1]}: another aspect ratio, which "
            f"the published code (resizing each from its own size) would misalign; regenerate "
            f"this map from its image, or pass --stretch-saliency to stretch it to the image (a "
            f"deviation; tools/check_dataset.py lists every such map)")
    return kind


@dataclass
class SaliencyMapsReport:
    """What ``check_saliency_maps`` found; each list holds ids ("id (map WxH, image WxH)" for sizes)."""
    num_maps: int
    stretch: bool
    rescaled: List[str] = field(default_factory=list)      # accepted: as published
    other_aspect: List[str] = field(default_factory=list)  # refused, or stretched with stretch=True
    sixteen_bit: List[str] = field(default_factory=list)   # read at full depth
    unreadable: List[str] = field(default_factory=list)    # format errors / corrupt files

    def summary(self) -> str:
        """The one log line of a run that passed."""
        text = (f"saliency maps: {self.num_maps} checked; {len(self.rescaled)} at another "
                f"resolution than their image with its aspect ratio (resized to the image's size, "
                f"the published result)")
        if self.other_aspect:
            text += (f"; {len(self.other_aspect)} with another aspect ratio stretched to their "
                     f"image (--stretch-saliency, a deviation; first: {examples(self.other_aspect)})")
        if self.sixteen_bit:
            text += f"; {len(self.sixteen_bit)} 16-bit maps read at full depth"
        return text

    def error(self) -> Optional[DataError]:
        """The refusal of the run, or None."""
        parts = []
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} of {self.num_maps} ids have an image or "
                         f"saliency map that cannot be read without wrong values "
                         f"({examples(self.unreadable)}): replace or fix these files, or remove "
                         f"their ids from the list")
        if self.other_aspect and not self.stretch:
            parts.append(f"{len(self.other_aspect)} of {self.num_maps} saliency maps have another "
                         f"aspect ratio than their image ({examples(self.other_aspect)}), which "
                         f"the published code (resizing each from its own size) would misalign: "
                         f"{STRETCH_FIX}")
        if not parts:
            return None
        return DataError("; ".join(parts) + " (tools/check_dataset.py --saliency-root lists all)")


def _sizes(img_path, sal_path) -> Tuple[Tuple[int, int], Tuple[int, int], bool]:
    """(image size, map size, map is 16-bit) from the headers; pixel formats checked as the
    loaders will (8-bit files are not decoded). Raises DataError."""
    sizes = []
    for path, what, to_8bit in ((img_path, "image", image_to_8bit),
                                (sal_path, "saliency map", saliency_to_8bit)):
        try:  # one file at a time, so the message names the one that failed
            with Image.open(path) as f:
                to_8bit(f, path)
                sizes.append((f.size, is_sixteen_bit(f)))
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read {what} {path} ({e})") from None
    (image_size, _), (map_size, sixteen) = sizes
    return image_size, map_size, sixteen


def check_saliency_maps(dataset, stretch: bool, progress: bool = False,
                        log: bool = True) -> SaliencyMapsReport:
    """Header check of every (image, saliency map) pair of a ``ClsSalDataset`` (``ids``,
    ``image_paths``, ``extra_paths[i]["saliency"]``) before any compute.

    Counts maps at another resolution (accepted) and 16-bit maps, logs one INFO line and returns
    the report. Maps with another aspect ratio (unless ``stretch``) and files that cannot be read
    without wrong values raise one ``DataError`` listing the first ids and the fix.
    """
    report = SaliencyMapsReport(len(dataset.ids), bool(stretch))
    items = zip(dataset.ids, dataset.image_paths, (e["saliency"] for e in dataset.extra_paths))
    from utils.progress import Progress
    bar = Progress(len(dataset.ids), "check saliency maps", unit="map",
                   enabled=progress and len(dataset.ids) >= 2000)
    for img_id, img_path, sal_path in items:
        bar.update(1)
        try:
            image_size, map_size, sixteen = _sizes(img_path, sal_path)
        except DataError as e:
            report.unreadable.append(f"{img_id}: {e}")
            continue
        if sixteen:
            report.sixteen_bit.append(img_id)
        kind = size_kind(image_size, map_size)
        if kind != SAME:
            entry = (f"{img_id} (map {map_size[0]}x{map_size[1]}, image "
                     f"{image_size[0]}x{image_size[1]})")
            (report.rescaled if kind == RESCALED else report.other_aspect).append(entry)
    bar.close()
    err = report.error()
    if err is not None:
        raise err
    if log:
        logger.info("%s", report.summary())
    return report
