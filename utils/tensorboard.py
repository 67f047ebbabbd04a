"""``--tensorboard``: training curves and CAM overlays as TensorBoard event files.

The run directory and its ``metrics.jsonl`` stay the record of a run (plots, resume checks and
the tests read them); the event files under ``<run dir>/tensorboard/`` are a view of the same
numbers for people who watch their runs in TensorBoard (``tensorboard --logdir runs``). Every
scalar of a metrics.jsonl record is written under its own name (``loss``, ``loss_cls``, ``lr``,
``images_per_s``, ...) at its ``iter`` (utils/run.JsonlLogger mirrors each record here);
train.py adds a few CAM overlays at each checkpoint, train_seg.py writes the scalars.

The ``tensorboard`` package is optional (``pip install -r requirements-tensorboard.txt``) and is
imported here only, when the flag is on; without it the flag is a one-line error before any
compute. Rank 0 writes; a resumed run first hides the events a killed run wrote after its last
checkpoint (``purge_step``), as ``metrics.jsonl`` drops those records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from utils.errors import UserError

REQUIREMENT = "requirements-tensorboard.txt"
FOLDER = "tensorboard"


class TensorboardMissing(UserError):
    """The tensorboard package is not installed."""


def summary_writer_class():
    """torch's SummaryWriter, or a one-line error naming the requirement file."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorboardMissing(f"--tensorboard needs the tensorboard package: pip install -r "
                                 f"{REQUIREMENT} (or leave the flag out: metrics.jsonl has the "
                                 f"same numbers)") from None
    return SummaryWriter


class Board:
    """Event files in ``<run dir>/tensorboard``. ``start_iter`` > 0 (a resume) purges the events
    of later steps that a killed run left behind."""

    def __init__(self, run_dir, start_iter: int = 0):
        self.folder = Path(run_dir) / FOLDER
        self.writer = summary_writer_class()(str(self.folder),
                                             purge_step=start_iter + 1 if start_iter else None)

    def scalars(self, record: Mapping[str, object]) -> None:
        """A metrics.jsonl record: each number under its own name, at the record's ``iter``; a
        list of numbers (train_seg.py's ``loss_terms``) as ``<name>/<index>``."""
        step = int(record["iter"])
        for key, value in record.items():
            values = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, v in values:
                if key != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(key if i is None else f"{key}/{i}", float(v), step)
        self.writer.flush()

    def images(self, tag: str, images: np.ndarray, step: int) -> None:
        """uint8 (N, H, W, 3) images under one tag."""
        self.writer.add_images(tag, np.asarray(images, np.uint8), step, dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(enabled: bool, run_dir, start_iter: int = 0, main_process: bool = True
               ) -> Optional[Board]:
    """The run's Board when ``--tensorboard`` is on, on rank 0; None otherwise."""
    return Board(run_dir, start_iter) if enabled and main_process else None
