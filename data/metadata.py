"""Plain-text metadata: id lists, class names and image-level labels.

Formats (all UTF-8 text, ``#`` starts a comment line):

* id list (``train.txt``): one image id per line. For compatibility with PSA-style lists, a line
  such as ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` is reduced to its
  id (the stem of the first token). An id listed twice is kept once (first occurrence, with a
  warning): a repeated id would be trained on twice and counted twice by the evaluator.
* class names (``labels.txt``): ``<index> <name>`` lines, index 0 = background.
* image labels (``image_labels.txt``): ``<id> <c> <c> ...`` with the 0-based indices of the
  foreground classes present (background excluded). An id with no index is an image with no class,
  which is an error when the labels are used for training or CAM masking. An id on two lines is an
  error when the lines disagree, a warning when they repeat the same classes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from utils.io import atomic_write_text  # noqa: F401  (re-exported for the metadata writers)
from utils.errors import UserError

logger = logging.getLogger(__name__)

# How many offending ids a warning or error quotes.
SHOW_IDS = 5


class MetadataError(UserError):
    """A metadata file is missing or malformed; the message names the file and the fix."""


def _content_lines(path: Path):
    """Yield (line_number, stripped_line) for non-empty, non-comment lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: file not found")
    # Decoded line by line, so an error names the line; bytes.splitlines ends lines at \n, \r\n
    # and \r, as text mode does. A byte-order mark (editors on Windows add one) is dropped: it
    # would otherwise become part of the first id, which then matches no image.
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise MetadataError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save the file "
                                "as UTF-8 (plain text, one entry per line)") from None
        if line and not line.startswith("#"):
            yield lineno, line


def _id_of(line: str) -> str:
    token = line.split()[0]
    if "/" in token or token.endswith((".jpg", ".png", ".jpeg")):
        token = Path(token).stem
    return token


def dedupe_ids(ids: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(ids without repeats in first-occurrence order, the dropped repeats in file order)."""
    seen, unique, dropped = set(), [], []
    for i in ids:
        if i in seen:
            dropped.append(i)
        else:
            seen.add(i)
            unique.append(i)
    return unique, dropped


def read_id_list(path, *, keep_duplicates: bool = False) -> List[str]:
    """Read an id list; PSA-style ``/JPEGImages/x.jpg ...`` lines are reduced to ``x``.

    An id listed twice is kept once, at its first position, with a warning: training would see it
    twice and the evaluator would count its pixels twice (a silently different mIoU).
    ``keep_duplicates=True`` returns the lines as they are, for checkers that report repeats."""
    ids = [_id_of(line) for _, line in _content_lines(path)]
    if not ids:
        raise MetadataError(f"{path}: the id list is empty; put one image id per line in it, "
                            f"or pass another list")
    if keep_duplicates:
        return ids
    unique, dropped = dedupe_ids(ids)
    if dropped:
        first = list(dict.fromkeys(dropped))[:SHOW_IDS]
        logger.warning("%s: %d duplicate id line(s) dropped, first occurrence kept (%d unique ids "
                       "remain); repeated ids: %s%s", path, len(dropped), len(unique),
                       ", ".join(first), ", ..." if len(set(dropped)) > SHOW_IDS else "")
    return unique


def read_class_names(path) -> List[str]:
    """Read ``labels.txt``; returns all names including background at index 0."""
    names: Dict[int, str] = {}
    for lineno, line in _content_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise MetadataError(f"{path}:{lineno}: expected '<index> <name>' (e.g. '1 "
                                f"aeroplane'), got {line!r}; write one class per line, 0 = "
                                f"background (docs/data.md)")
        names[int(parts[0])] = parts[1].strip()
    if sorted(names) != list(range(len(names))):
        gap = min(set(range(len(names) + 1)) - set(names))
        raise MetadataError(f"{path}: class indices must be 0..N-1 without gaps (0 = background), "
                            f"but {gap} is missing; number the classes 0, 1, 2, ...")
    return [names[i] for i in range(len(names))]


def read_image_labels(path, num_classes: int) -> Dict[str, np.ndarray]:
    """Read ``image_labels.txt`` into {id: float32 multi-hot vector of length num_classes}.

    An id on two lines: when the lines name different classes it is a MetadataError naming both
    line numbers (which line is right cannot be known, and taking the last one silently changed the
    training labels). When they name the same classes (e.g. two label files concatenated) nothing
    about the labels is ambiguous, so the id is kept once with one warning for the whole file."""
    labels: Dict[str, np.ndarray] = {}
    first_line: Dict[str, int] = {}
    repeats: List[str] = []
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
        img_id = parts[0]
        if img_id in labels:
            if not np.array_equal(labels[img_id], vec):
                raise MetadataError(
                    f"{path}: id {img_id!r} is on line {first_line[img_id]} and line {lineno} with "
                    f"different classes ({_class_list(labels[img_id])} vs {_class_list(vec)}); "
                    f"keep the right line and delete the other")
            repeats.append(img_id)
            continue
        labels[img_id] = vec
        first_line[img_id] = lineno
    if repeats:
        logger.warning("%s: %d id(s) repeated on later lines with the same classes, kept once: %s%s",
                       path, len(repeats), ", ".join(repeats[:SHOW_IDS]),
                       ", ..." if len(repeats) > SHOW_IDS else "")
    return labels


def _class_list(vec: np.ndarray) -> str:
    return "[" + " ".join(str(i) for i in np.flatnonzero(vec)) + "]"


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
