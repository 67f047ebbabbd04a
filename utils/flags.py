"""The flags several entry points share, declared once.

train.py, infer.py, evaluate.py, train_seg.py and infer_seg.py (and tools/) call these instead of
spelling the flags out again, so a flag means the same, is spelled the same and says the same in
every ``--help``. Each function adds one flag to a parser or argument group and returns its
action; the arguments are what legitimately differs between the stages (the default, which files
a check reads). The spelling shown is the hyphenated one; the underscore twin (the published
spelling, e.g. EPS main.py's ``--data_root``) is a hidden alias (utils/cli.py, ``add_flag``).
The distributed flags live in ``utils/dist.add_dist_args`` and the numerics flags in
``utils/device.add_numerics_args``, next to the code that reads them.

No torch import here: evaluate.py's start-up must not pay for it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional

from utils.cli import add_flag

BOOL = argparse.BooleanOptionalAction


# --- data ---------------------------------------------------------------------------------------
def add_dataset(p, choices: Iterable[str], help: Optional[str] = None,
                default: str = "voc12") -> argparse.Action:
    return add_flag(p, "--dataset", type=str, default=default, choices=sorted(choices), help=help or (
        "dataset registry entry (data/registry.py): voc12 (PASCAL VOC 2012, 20 classes), coco "
        "(MS-COCO 2014, 80) or custom (VOC layout, labels.txt and the id lists in the dataset "
        "root or --metadata-dir); published: voc12 / coco"))


def add_data_root(p, *aliases: str, dest: str = "data_root", required: bool = True,
                  help: Optional[str] = None) -> argparse.Action:
    return add_flag(p, "--data-root", *aliases, dest=dest, type=Path, required=required,
                    default=None, metavar="DATA_ROOT", help=help or (
                        "dataset root (VOC: VOCdevkit/VOC2012, or its JPEGImages/ as in the "
                        "published commands; COCO: the folder holding train2014/)"))


def add_metadata_dir(p) -> argparse.Action:
    return add_flag(p, "--metadata-dir", type=Path, default=None, help=(
        "folder with labels.txt, image_labels.txt and the id lists (default: the repository's "
        "metadata/<dataset>, or the dataset root for --dataset custom)"))


def add_skip_missing(p, files: str = "image") -> argparse.Action:
    return add_flag(p, "--skip-missing", action=BOOL, default=False, help=(
        f"drop listed ids whose {files} file is missing and report the count (default: stop "
        f"with an error naming the file)"))


def add_check_data(p, reads: str = "every image's header (~1 ms per file)",
                   when: str = "before any compute") -> argparse.Action:
    return add_flag(p, "--check-data", action=BOOL, default=True, help=(
        f"first read {reads}, so that a bad file stops the run {when} instead of hours into it "
        f"(default on)"))


def add_num_workers(p, default: int, help: str) -> argparse.Action:
    return add_flag(p, "--num-workers", type=int, default=default, help=help)


# --- devices ------------------------------------------------------------------------------------
def add_device(p) -> argparse.Action:
    return add_flag(p, "--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help=(
        "auto = CUDA when it works (a warning says why not), and under a launcher with more "
        "than 1 process CUDA or an error; cuda = fail with the reason when it does not; "
        "cpu = the CPU"))


def add_channels_last(p, default: bool, help: str) -> argparse.Action:
    return add_flag(p, "--channels-last", action=BOOL, default=default, help=help)


def add_training_amp(p) -> argparse.Action:
    return add_flag(p, "--amp", type=str, default="off", choices=["off", "bf16", "fp16"], help=(
        "mixed precision (fp16: CUDA, with a GradScaler; bf16: CUDA with compute capability "
        ">= 8.0, or the CPU). Published: off (fp32)"))


# --- runs ---------------------------------------------------------------------------------------
def add_seed(p) -> argparse.Action:
    return add_flag(p, "--seed", type=int, default=0, help=(
        "seed of initialisation, data order, augmentation and dropout (the published code set "
        "no seed)"))


def add_resume(p, run_dir_flag: str) -> argparse.Action:
    return add_flag(p, "--resume", type=str, nargs="?", const="auto", default=None, metavar="CKPT",
                    help=f"continue from a checkpoint: without a value, <{run_dir_flag}>/"
                         f"checkpoint_last.pth (starting fresh if there is none); or a path to a "
                         f"checkpoint_last-style file")


def add_extend(p, final_name: str) -> argparse.Action:
    return add_flag(p, "--extend", action=BOOL, default=False, help=(
        f"with --resume on a FINISHED run and a larger --max-iters: train it further (the poly "
        f"schedule is stretched to the new length; the finished {final_name} is kept as "
        f"{Path(final_name).stem}_iter<N>.pth)"))


def add_stop_after(p) -> argparse.Action:
    return add_flag(p, "--stop-after", type=int, default=None, help=(
        "stop with a checkpoint after this many iterations of this invocation (for "
        "time-limited job slots); --resume continues"))


def add_ckpt_every(p, default: int, published: str) -> argparse.Action:
    return add_flag(p, "--ckpt-every", type=int, default=default, help=(
        f"iterations between rewrites of the resume checkpoint checkpoint_last.pth (default "
        f"{default}; published: {published})"))


def add_log_every(p, default: int, published: str) -> argparse.Action:
    return add_flag(p, "--log-every", type=int, default=default, help=(
        f"iterations averaged per metrics.jsonl record and loss check (default {default}; "
        f"published: {published})"))


def add_overwrite(p, help: str) -> argparse.Action:
    return add_flag(p, "--overwrite", action=BOOL, default=False, help=help)


def add_tensorboard(p) -> argparse.Action:
    return add_flag(p, "--tensorboard", action=BOOL, default=False, help=(
        "also write TensorBoard event files to <run dir>/tensorboard: the scalars of "
        "metrics.jsonl (which stays the record) and CAM overlays at each checkpoint; needs "
        "pip install -r requirements-tensorboard.txt (published: none)"))
