"""Plain-text metadata: id lists, class names and image-level labels.

Formats (all UTF-8 text, ``#`` starts a comment line):

* id list (``train.txt``): one image id per line. For compatibility with PSA-style lists, a line
  such as ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` is reduced to its
  id (the stem of the first token).
* class names (``labels.txt``): ``<index> <name>`` lines, index 0 = background.
* image labels (``image_labels.txt``): ``<id> <c> <c> ...`` with the 0-based indices of the
  foreground classes present (background excluded). An id with no index is an image with no class,
  which is an error when the labels are used for training or CAM masking.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence

import numpy as np

from utils.io import atomic_write_text  # noqa: F401  (re-exported for the metadata writers)
from utils.errors import UserError


class MetadataError(UserError):
    """A metadata file is missing or malformed; the message names the file and the fix."""


def _content_lines(path: Path):
    """Yield (line_number, stripped_line) for non-empty, non-comment lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: file not found")
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield lineno, line


def read_id_list(path) -> List[str]:
    """Read an id list; PSA-style ``/JPEGImages/x.jpg ...`` lines are reduced to ``x``."""
    ids = []
    for _, line in _content_lines(path):
        token = line.split()[0]
        if "/" in token or token.endswith((".jpg", ".png", ".jpeg")):
            token = Path(token).stem
        ids.append(token)
    if not ids:
        raise MetadataError(f"{path}: the id list is empty")
    return ids


def read_class_names(path) -> List[str]:
    """Read ``labels.txt``; returns all names including background at index 0."""
    names: Dict[int, str] = {}
    for lineno, line in _content_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise MetadataError(f"{path}:{lineno}: expected '<index> <name>', got {line!r}")
        names[int(parts[0])] = parts[1].strip()
    if sorted(names) != list(range(len(names))):
        raise MetadataError(f"{path}: class indices must be 0..N-1 without gaps (0 = background)")
    return [names[i] for i in range(len(names))]


def read_image_labels(path, num_classes: int) -> Dict[str, np.ndarray]:
    """Read ``image_labels.txt`` into {id: float32 multi-hot vector of length num_classes}."""
    labels: Dict[str, np.ndarray] = {}
    for lineno, line in _content_lines(path):
        parts = line.split()
        try:
            idx = [int(p) for p in parts[1:]]
        except ValueError:
            raise MetadataError(f"{path}:{lineno}: class indices must be integers, got {line!r}") from None
        bad = [i for i in idx if not 0 <= i < num_classes]
        if bad:
            raise MetadataError(
                f"{path}:{lineno}: class index {bad[0]} outside 0..{num_classes - 1} "
                f"(indices are 0-based and exclude background)")
        vec = np.zeros(num_classes, dtype=np.float32)
        vec[idx] = 1.0
        labels[parts[0]] = vec
    return labels


def format_image_labels(labels: Mapping[str, Sequence[float]], header: str = "") -> str:
    """Text of an ``image_labels.txt`` for {id: multi-hot vector} (ids kept in the given order)."""
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    for img_id, vec in labels.items():
        idx = np.flatnonzero(np.asarray(vec) > 0.5)
        lines.append(" ".join([img_id] + [str(i) for i in idx]))
    return "\n".join(lines) + "\n"


def write_image_labels(path, labels: Mapping[str, Sequence[float]], header: str = "") -> None:
    atomic_write_text(path, format_image_labels(labels, header))


def write_id_list(path, ids: Iterable[str]) -> None:
    atomic_write_text(path, "".join(f"{i}\n" for i in ids))


def write_class_names(path, names: Sequence[str]) -> None:
    """Write ``labels.txt`` from all names including background at index 0."""
    atomic_write_text(path, "".join(f"{i} {n}\n" for i, n in enumerate(names)))
