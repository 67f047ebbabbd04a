"""Second stage: train DeepLab-v2 (ResNet-101, MSC) on a folder of pseudo-mask PNGs.

Published recipe (kazuto1011/deeplab-pytorch configs/voc12.yaml and main.py train), all defaults:
SGD momentum 0.9, lr 2.5e-4 (ASPP weights 10x, biases 20x without weight decay), weight decay
5e-4, poly 0.9 updated every 10 iterations, 20,000 iterations of batch 5 x 2 accumulated
(effective 10), crop 321, scales {0.5, 0.75, 1, 1.25, 1.5}, Caffe BGR mean, frozen BN, loss =
sum over the 4 MSC outputs of CE(ignore 255) with labels nearest-resized to each output.

    python train_seg.py --data-root $VOC --mask-dir $OUT/result/png \\
        --init deeplabv1_resnet101-coco.pth --run-dir $OUT/deeplab
    torchrun --nproc_per_node 2 train_seg.py ...     # 10 x 1 on 2 processes: 5 per GPU

--batch-size is the GLOBAL batch of one forward pass (split over torchrun processes, as in
train.py); the effective batch is batch-size x iter-size whatever the number of processes. Left
unset, the two are chosen for the number of processes so that the effective batch stays the
published 5 x 2 = 10 with at most 5 images per process and pass (resolve_batch). The
data order is the seeded, resumable one of train.py (utils/sampler.py), so a killed run resumed
with --resume ends bitwise equal to an uninterrupted one.

Run directory (--run-dir): args.json, env.json, log.txt, metrics.jsonl, checkpoint_last.pth (full
state for --resume, rewritten every --ckpt-every iterations), checkpoint_<it>.pth every
--save-every iterations (published 5,000) and checkpoint_final.pth (plain state dict with
"base." keys, the deeplab-pytorch layout; its presence means "finished"). An existing run is
never overwritten: pass --resume to continue it (and --extend to train a finished one further).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data.datasets import DataError, SegDataset, check_files
from data.registry import DATASETS, check_data_root, dataset_root_of, get_dataset
from data.seg_transforms import CROP_SIZE, IGNORE_LABEL, TRAIN_SCALES, SegTrainTransform
from network.deeplab import (MAX_SCALE, MIN_SCALE, MSC_SCALES, SEG_ARCHS, build_deeplab,
                             load_init_weights)
from utils import dist, flags, provenance
from utils.checkpoint import (changed_settings, open_run_dir, restore_training_state,
                              save_training_state, start_run)
from utils.cli import add_flag, parent_parser, run_cli
from utils.device import (add_numerics_args, check_shared_memory, configure_numerics, pin_memory,
                          resolve_device)
from utils.errors import UserError
from utils.io import atomic_write_text, torch_save
from utils.layout import LayoutError, plan_layout, working_counts
from utils.optim import build_optimizer, poly_lr
from utils.progress import Progress
from utils.run import JsonlLogger, close_file_log, setup_logging, write_run_info
from utils.sampler import seeded_loader
from utils.tensorboard import open_board, summary_writer_class

logger = logging.getLogger("train_seg")

# deeplab-pytorch configs/voc12.yaml SOLVER values.
LR, MOMENTUM, WEIGHT_DECAY, POLY_POWER, LR_DECAY_EVERY = 2.5e-4, 0.9, 5e-4, 0.9, 10
MAX_ITERS, BATCH_SIZE, ITER_SIZE, SAVE_EVERY, AVERAGE_LOSS = 20000, 5, 2, 5000, 20
FINAL_NAME, LAST_NAME = "checkpoint_final.pth", "checkpoint_last.pth"


class TrainSegError(UserError):
    """A problem with the run set-up; the message says what to change."""


def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("DeepLab-v2 training on pseudo-masks")
    d = p.add_argument_group("data")
    flags.add_dataset(d, DATASETS, help="dataset registry entry (voc12: 21 outputs incl. "
                                        "background; coco: 81; custom: VOC layout)")
    flags.add_data_root(d, help="dataset root (VOC: the folder holding JPEGImages) or its "
                                "JPEGImages folder")
    flags.add_metadata_dir(d)
    add_flag(d, "--mask-dir", type=Path, default=None,
                   help="folder of pseudo-mask PNGs <id>.png (0 = background, 1..C, 255 = ignore), "
                        "e.g. EPS's result/png; default: the dataset's ground truth (a fully "
                        "supervised run, not the paper's setting)")
    add_flag(d, "--train-list", type=str, default="train_aug",
             help="id list, a split name or a path (paper: train_aug, 10,582 images)")
    flags.add_skip_missing(d, "image or mask")
    flags.add_check_data(d, "every image's header and every mask (mode, size, values 0..C or "
                            "--ignore-label; ~2 ms per id)")
    flags.add_num_workers(d, 4, "DataLoader workers per process (results do not depend on it; "
                                "published 0)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", type=str, default="deeplabv2_resnet101", choices=sorted(SEG_ARCHS),
                   help="deeplabv2_resnet101 (paper) or deeplabv2_small (tiny CPU demo/test net)")
    m.add_argument("--init", type=str, default=None,
                   help="initial weights: deeplabv1_resnet101-coco.pth (paper, COCO-pretrained, "
                        "deeplab-pytorch layout) or a torchvision ImageNet resnet101 .pth; 'none' "
                        "trains from scratch (default for deeplabv2_small only)")
    add_flag(m, "--init-kind", type=str, default="auto",
                   choices=["auto", "deeplab", "torchvision"],
                   help="layout of --init (default: detected from the key names)")
    add_flag(m, "--allow-supervised-init", action=argparse.BooleanOptionalAction, default=False,
             help="accept an --init whose classifier has this dataset's class count, i.e. a "
                  "DeepLab trained on its label set (e.g. deeplab-pytorch's "
                  "deeplabv2_resnet101_msc-vocaug-20000.pth): refused by default, because it "
                  "makes the weakly supervised result fully supervised (paper: off)")
    add_flag(m, "--msc-scales", type=float, nargs="+",
                   default=list(MSC_SCALES), help="extra input scales of MSC (paper: 0.5 0.75)")
    o = p.add_argument_group("optimisation (defaults = published recipe)")
    o.add_argument("--lr", type=float, default=LR, help="base lr (paper 2.5e-4; ASPP 10x / 20x)")
    o.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD momentum (paper 0.9)")
    add_flag(o, "--weight-decay", type=float,
                   default=WEIGHT_DECAY, help="weight decay (paper 5e-4; none on ASPP biases)")
    add_flag(o, "--poly-power", type=float,
                   default=POLY_POWER, help="poly lr power (paper 0.9)")
    add_flag(o, "--lr-decay-every", type=int,
                   default=LR_DECAY_EVERY, help="the lr is updated every N iterations (paper 10)")
    add_flag(o, "--max-iters", type=int, default=MAX_ITERS,
                   help="optimizer steps (paper 20,000)")
    add_flag(o, "--batch-size", type=int, default=None,
                   help="GLOBAL images per forward pass, split over torchrun processes (paper 5; "
                        "default: chosen with --iter-size for the process count, see resolve_batch)")
    add_flag(o, "--iter-size", type=int, default=None,
                   help="forward/backward passes accumulated per step (paper 2: batch 5 x 2 = 10; "
                        "default: chosen with --batch-size for the process count)")
    add_flag(o, "--crop-size", type=int, default=CROP_SIZE,
                   help="square training crop (paper 321)")
    o.add_argument("--scales", type=float, nargs="+", default=list(TRAIN_SCALES),
                   help="discrete random scales (paper 0.5 0.75 1.0 1.25 1.5)")
    add_flag(o, "--ignore-label", type=int,
                   default=IGNORE_LABEL, help="mask value excluded from the loss (255)")
    flags.add_training_amp(o)
    r = p.add_argument_group("run")
    add_flag(r, "--run-dir", type=Path,
                   required=True, help="output folder (checkpoints, logs, metrics)")
    flags.add_resume(r, "run-dir")
    flags.add_extend(r, FINAL_NAME)
    flags.add_stop_after(r)
    add_flag(r, "--save-every", type=int, default=SAVE_EVERY,
                   help="keep checkpoint_<iter>.pth every N iterations (paper 5,000; 0 = never)")
    flags.add_ckpt_every(r, 500, "none, deeplab-pytorch kept only the --save-every files")
    flags.add_log_every(r, AVERAGE_LOSS, "deeplab-pytorch averaged 20")
    add_flag(r, "--eval-list", type=str, default=None,
                   help="after training, run infer_seg.py on this list (e.g. val) into "
                        "<run-dir>/pred_<list> and evaluate it (default: off)")
    add_flag(r, "--eval-crf", action=argparse.BooleanOptionalAction, default=False,
                   help="with --eval-list, also the dense-CRF result (DeepLab parameters)")
    flags.add_seed(r)
    flags.add_device(r)
    flags.add_tensorboard(r)
    add_numerics_args(r, cudnn_benchmark=True, published="on (deeplab-pytorch main.py)")
    dist.add_dist_args(r)
    dist.add_peer_timeout_arg(r)
    return p


# --------------------------------------------------------------------------------------------
# Small pure pieces (tested on their own)

def step_poly_lr(it: int, base_lr: float, max_iters: int, power: float, every: int) -> float:
    """lr of 0-based iteration ``it`` under deeplab-pytorch's PolynomialLR(step_size=every).

    1. The scheduler is stepped after each iteration with epoch = iteration number;
    2. it recomputes base * (1 - epoch / max) ** power only when epoch % every == 0,
    3. so iterations [k*every, (k+1)*every) all use the value for epoch k*every."""
    return poly_lr((it // every) * every, base_lr, max_iters, power)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N,H,W) int labels -> (N,h,w) with PIL NEAREST's sampling (pixel centres:
    src = floor((dst + 0.5) * scale)), which torch calls 'nearest-exact'."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    out = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return out[:, 0].long()


def seg_loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor,
             ignore_index: int = IGNORE_LABEL) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum over the MSC outputs of CE(ignore_index), labels resized to each output's size.
    Returns (total, the detached terms as one tensor on the device: no host sync).

    The mean is over valid pixels (as nn.CrossEntropyLoss); a crop with no valid pixel adds 0
    instead of NaN (upstream would produce NaN and poison the weights)."""
    total, terms = 0.0, []
    for logit in outputs:
        lab = resize_labels(labels, logit.shape[-2:])
        n_valid = (lab != ignore_index).sum().clamp(min=1)
        ce = F.cross_entropy(logit.float(), lab, ignore_index=ignore_index, reduction="sum") / n_valid
        total = total + ce
        terms.append(ce.detach())
    return total, torch.stack(terms)


def check_labels(labels: torch.Tensor, ids: Sequence[str], n_classes: int, ignore: int,
                 mask_dir) -> None:
    """Fail with the file name when a mask holds a value that is neither a class nor ignore."""
    bad = (labels >= n_classes) & (labels != ignore)
    if bool(bad.any()):
        i = int(bad.flatten(1).any(1).nonzero()[0])
        vals = sorted(set(labels[i][bad[i]].unique().tolist()))
        where = f"{mask_dir}/{ids[i]}.png" if mask_dir else f"the ground truth of {ids[i]}"
        raise DataError(f"{where} has values {vals[:5]} outside 0..{n_classes - 1} and "
                        f"{ignore} (ignore); masks must hold class indices (0 = background)")


# --------------------------------------------------------------------------------------------

def build_model(args, n_classes: int, init: bool):
    model = build_deeplab(args.arch, n_classes, msc_scales=args.msc_scales)
    if args.init is None and args.arch == "deeplabv2_resnet101":
        raise TrainSegError(
            "DeepLab-v2 ResNet-101 needs initial weights: --init deeplabv1_resnet101-coco.pth "
            "(the paper's COCO init: bash script/download.sh weights) or a torchvision resnet101 "
            ".pth; --init none trains from scratch (not a paper setting)")
    if not init:
        return model
    if args.init is not None and args.init.lower() != "none":
        if not Path(args.init).is_file():
            raise TrainSegError(f"--init {args.init}: file not found; pass "
                                f"deeplabv1_resnet101-coco.pth (bash script/download.sh weights), a torchvision "
                                f"resnet101 .pth, or --init none")
        load_init_weights(model, args.init, args.init_kind,
                          allow_supervised=args.allow_supervised_init)
    else:
        logger.warning("no --init: %s starts from random weights", args.arch)
    return model


EFFECTIVE_BATCH = BATCH_SIZE * ITER_SIZE  # published 5 x 2
MAX_PER_PROCESS = BATCH_SIZE              # images per process and pass of the published run


def resume_start_batch(start_iter: int, n_samples: int, old_batch: int, old_iter_size: int,
                       new_batch: int, new_iter_size: int) -> Tuple[int, str]:
    """(first micro-batch of the resumed run, a note when it is not an exact continuation).

    The sampler (utils/sampler.py) counts micro-batches of the global --batch-size, ``n_samples
    // batch`` per epoch. A checkpoint written with another split (5 x 2 on 1 process, 10 x 1 on
    2) stopped ``k`` micro-batches into epoch ``e``; the resumed run starts in the same epoch
    (same permutation, same augmentation seeds) at the first batch of the new size that does not
    skip an image of the old position. Only the end of each epoch (drop_last of another batch
    size) differs from an uninterrupted run, and the difference does not add up over epochs."""
    if (old_batch, old_iter_size) == (new_batch, new_iter_size):
        return start_iter * new_iter_size, ""
    epoch, k = divmod(start_iter * old_iter_size, n_samples // old_batch)
    seen = k * old_batch  # images of epoch `epoch` already used
    start_batch = epoch * (n_samples // new_batch) + seen // new_batch
    note = (f"resuming with batch {new_batch} x {new_iter_size} accumulated (checkpoint: "
            f"{old_batch} x {old_iter_size}); the data continues in epoch {epoch} after its "
            f"{seen} images already seen")
    if seen % new_batch:
        note += f" (from image {seen // new_batch * new_batch}: a few are seen twice)"
    if old_batch * old_iter_size != new_batch * new_iter_size:
        note += "; the effective batch changed, so iterations are no longer comparable"
    else:
        note += "; each epoch's last images can differ from an uninterrupted run's (drop_last)"
    return start_batch, note


def resolve_batch(batch_size: Optional[int], iter_size: Optional[int], world: int,
                  effective: int = EFFECTIVE_BATCH) -> Tuple[int, int]:
    """(global batch per pass, accumulation) for ``world`` processes.

    Unset (None, None): the published effective batch (5 x 2 = 10) split by the layout planner
    (utils/layout.py) with at most 5 images per process and pass, fewest accumulation steps
    first: 1 process 5 x 2 (published), 2 processes 10 x 1 (5 each), 5 processes 10 x 1 (2 each),
    10 processes 10 x 1. A world size that cannot keep it is refused with the ones that can: the
    effective batch is never changed silently (the pipeline scripts ask the planner for a count
    that works). Set values are only checked."""
    if batch_size is None and iter_size is None:
        try:
            layout = plan_layout(effective, world, procs_per_node=world, what="DeepLab",
                                 max_per_process=MAX_PER_PROCESS, override="the process count")
        except LayoutError:
            ok = working_counts(effective, max_per_process=MAX_PER_PROCESS)
            raise TrainSegError(
                f"{world} processes cannot split the published effective batch {effective} "
                f"(5 x 2) evenly: use {', '.join(map(str, ok))} processes for this stage "
                f"(SEG_NGPUS for the scripts, which choose one by default), or set --batch-size "
                f"and --iter-size yourself (a deviation)") from None
        return layout.global_batch, layout.accum
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    iter_size = ITER_SIZE if iter_size is None else iter_size
    if batch_size < 1 or iter_size < 1:
        raise TrainSegError("--batch-size and --iter-size must be >= 1")
    if batch_size % world:
        raise TrainSegError(
            f"--batch-size {batch_size} (global, per forward pass) is not divisible by the "
            f"{world} processes; leave --batch-size and --iter-size unset to keep the published "
            f"effective batch 10 on 1, 2, 5 or 10 processes")
    return batch_size, iter_size


def check_args(args, world: int) -> None:
    """Every flag value, before any file is read or written; fills --batch-size/--iter-size."""
    args.batch_size, args.iter_size = resolve_batch(args.batch_size, args.iter_size, world)
    for name in ("max_iters", "lr_decay_every", "crop_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            raise TrainSegError(f"--{name.replace('_', '-')} must be >= 1")
    if args.stop_after is not None and args.stop_after < 1:
        raise TrainSegError("--stop-after must be >= 1")
    if args.num_workers < 0 or args.save_every < 0:
        raise TrainSegError("--num-workers and --save-every must be >= 0")
    # isfinite: an inf weight decay passed ">= 0" and turned the weights into NaN at step 2
    values = (args.lr, args.weight_decay, args.momentum, args.poly_power)
    if not all(math.isfinite(v) for v in values):
        raise TrainSegError("--lr, --weight-decay, --momentum and --poly-power must be finite")
    if not (args.lr > 0 and min(values[1:]) >= 0):
        raise TrainSegError("--lr must be > 0, --weight-decay, --momentum and --poly-power >= 0")
    for flag, scales, paper in (("--scales", args.scales, TRAIN_SCALES),
                                ("--msc-scales", args.msc_scales, MSC_SCALES)):
        bad = [v for v in scales if not (math.isfinite(v) and MIN_SCALE <= v <= MAX_SCALE)]
        if bad:  # a scale of 0 failed in the first batch, after the run directory was made
            raise TrainSegError(f"{flag} {' '.join(map(str, bad))}: each scale must be in "
                                f"[{MIN_SCALE}, {MAX_SCALE}] (paper: {' '.join(map(str, paper))})")
    if not 0 <= args.ignore_label <= 255:
        raise TrainSegError(f"--ignore-label {args.ignore_label} must be in 0..255 (masks are "
                            f"8-bit PNGs; published 255)")


def main(args) -> Dict:
    """Train; returns {"run_dir", "final" (None when stopped early), "losses": per-iteration}."""
    # 1. device, settings, data, checkpoint: every check before anything is written
    device = resolve_device(args.device, dist.get_local_rank())
    numerics = configure_numerics(device, tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark,
                                  amp=args.amp)
    dist.init_distributed(device, args.dist_timeout, args.peer_timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_args(args, world)
    check_shared_memory(args.num_workers)
    if args.tensorboard:
        summary_writer_class()  # a missing package is one line now, before any compute
    run_dir = args.run_dir
    run = start_run(run_dir, resume=args.resume, final_name=FINAL_NAME, last_name=LAST_NAME,
                    expect={"arch": args.arch, "dataset": args.dataset}, writer="train_seg.py",
                    max_iters=args.max_iters, extend=args.extend, dir_flag="--run-dir",
                    iters_flag="--max-iters")
    if run.finished:
        logger.info("%s is finished (iteration %d); nothing to do", run_dir, run.start_iter)
        return {"run_dir": run_dir, "final": run_dir / FINAL_NAME, "losses": []}
    ckpt, start_iter, resume = run.ckpt, run.start_iter, run.resume
    check_data_root(args.data_root, "--data_root")
    if args.mask_dir is not None and not args.mask_dir.is_dir():
        raise TrainSegError(f"--mask-dir {args.mask_dir}: no such folder; pass the folder of "
                            f"pseudo-mask PNGs (infer.py --png-dir)")
    info = get_dataset(args.dataset, args.metadata_dir, dataset_root_of(args.data_root))
    if args.eval_list:  # resolved now: a wrong name failed only after the training
        info.list_path(args.eval_list)
    n_classes = info.num_classes + 1
    # What this run is made from (utils/provenance.py): the pseudo-masks (their own record) and
    # the init file (name, size, sha256; in the pipeline's results table). A run is never
    # resumed on other inputs: its checkpoint would mix two trainings.
    record_file = run_dir / provenance.RUN_RECORD_NAME
    if ckpt is not None:
        stale = provenance.check(record_file)
        if stale:
            raise TrainSegError(f"{run_dir} was started on other inputs: {stale}; resuming would "
                                f"mix two trainings: start a new --run-dir (or move {run_dir} "
                                f"away)")
    inputs = provenance.read_record(record_file) if ckpt is not None else None
    if inputs is None and dist.is_main_process():  # rank 0 writes it (a hash of --init)
        init = args.init if args.init and args.init.lower() != "none" else None
        inputs = {"inputs": provenance.inputs_record({"masks": args.mask_dir, "init": init}),
                  "init": (dict(path=str(Path(init).resolve()),
                                **provenance.file_identity(init)) if init and Path(init).is_file()
                           else None)}
    dataset = SegDataset(info, args.data_root, info.read_ids(args.train_list), args.mask_dir,
                         SegTrainTransform(args.crop_size, args.scales, ignore_label=args.ignore_label),
                         skip_missing=args.skip_missing)
    if args.check_data:  # header reads on rank 0; every rank raises its error
        dist.check_on_main(lambda: check_files(
            dataset.ids, dataset.image_paths, [e["mask"] for e in dataset.extra_paths],
            num_classes=n_classes, ignore_label=args.ignore_label))
    # One sampler step = one micro-batch of --batch-size images (global); an optimizer step
    # takes --iter-size of them, so iteration k starts at micro-batch k * iter_size, counted in
    # the checkpoint's micro-batches when it was written on another number of processes.
    start_batch, split_note = start_iter * args.iter_size, ""
    if ckpt is not None:
        old = ckpt.get("args", {})
        start_batch, split_note = resume_start_batch(
            start_iter, len(dataset), old.get("batch_size", args.batch_size),
            old.get("iter_size", args.iter_size), args.batch_size, args.iter_size)
        if split_note:
            split_note += (f" (checkpoint: {ckpt.get('world_size', world)} process(es), "
                           f"now {world})")
    loader = seeded_loader(dataset, global_batch=args.batch_size, seed=args.seed,
                           start_batch=start_batch, rank=rank, world_size=world,
                           num_workers=args.num_workers, pin_memory=pin_memory(device),
                           flag="--batch-size")
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    model = build_model(args, n_classes, init=ckpt is None).to(device)

    # 2. run directory
    open_run_dir(run_dir, FINAL_NAME, start_iter)
    setup_logging(run_dir / "log.txt")
    try:
        write_run_info(run_dir, args, numerics=numerics)
        if dist.is_main_process() and inputs is not None:
            atomic_write_text(record_file, json.dumps(inputs, indent=2) + "\n")
        if inputs and inputs.get("init"):
            logger.info("init %s: %d bytes, sha256 %s", inputs["init"]["path"],
                        inputs["init"]["size"], inputs["init"]["sha256"])
        logger.info("%s, transform %s", dataset, dataset.transform)
        logger.info("effective batch %d = %d (global) x %d accumulated; %d per process (paper: "
                    "5 x 2)", args.batch_size * args.iter_size, args.batch_size, args.iter_size,
                    args.batch_size // world)
        if split_note:  # in the run's log.txt too, beside the resume it explains
            logger.warning("%s", split_note)
        result = train(args, model, loader, ckpt, run_dir, device, n_classes, resume)
    finally:
        close_file_log(run_dir / "log.txt")
    if result["final"] is not None and args.eval_list:
        result["eval"] = evaluate_after_training(args, result["final"])
    return result


def train(args, model, loader, ckpt, run_dir: Path, device, n_classes: int, resume=None) -> Dict:
    # 3. optimizer and restore
    optimizer = build_optimizer(model.get_parameter_groups(), args.lr, args.weight_decay,
                                momentum=args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_iter = 0
    if ckpt:
        start_iter = restore_training_state(ckpt, model=model, optimizer=optimizer, scaler=scaler,
                                            seed=args.seed)
        changed = changed_settings(ckpt, args, ("lr", "max_iters", "batch_size", "iter_size",
                                                "mask_dir", "init"))
        if changed:
            logger.warning("resuming with changed settings (checkpoint -> now): %s", changed)
        logger.info("resumed from %s at iteration %d", resume, start_iter)
        # the loaded tensors are a second copy of model + optimizer state: free them for the run
        ckpt.clear()
    jsonl = JsonlLogger(run_dir / "metrics.jsonl", mirror=open_board(  # --tensorboard: the same
        args.tensorboard, run_dir, start_iter, dist.is_main_process()))  # records as events
    jsonl.trim(start_iter)
    model.train()
    net = dist.wrap_ddp(model, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    end_iter = min(args.max_iters, start_iter + (args.stop_after or args.max_iters))
    batches = iter(loader)
    n_terms = len(args.msc_scales) + 2
    # Loss statistics stay on the device between log steps: no host sync per micro-batch.
    window = torch.zeros(n_terms + 1, dtype=torch.float64, device=device)
    history, window_n, t0 = [], 0, time.perf_counter()
    progress = Progress(args.max_iters, "train_seg", initial=start_iter,
                        enabled=dist.is_main_process())

    for it in range(start_iter, end_iter):
        # 4. lr for this iteration (constant within blocks of lr_decay_every iterations)
        for g in optimizer.param_groups:
            g["lr"] = step_poly_lr(it, g["base_lr"], args.max_iters, args.poly_power,
                                   args.lr_decay_every)
        optimizer.zero_grad(set_to_none=True)
        # 5. iter_size forward/backward passes; DDP syncs gradients on the last one only
        stats = torch.zeros(n_terms + 1, dtype=torch.float64, device=device)
        for micro in range(args.iter_size):
            ids, images, labels = next(batches)
            check_labels(labels, ids, n_classes, args.ignore_label, args.mask_dir)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            last_micro = micro == args.iter_size - 1
            with (contextlib.nullcontext() if net is model or last_micro else net.no_sync()):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = net(images)
                loss, terms = seg_loss(outputs, labels, args.ignore_label)
                # published: the sum of the 4 CE terms divided by ITER_SIZE, then backward
                scaler.scale(loss / args.iter_size).backward()
            stats += torch.cat([loss.detach()[None], terms]).double() / args.iter_size
        # 6. one optimizer step per iteration
        scaler.step(optimizer)
        scaler.update()
        window += stats
        window_n += 1
        history.append(stats[0])
        done = it + 1
        progress.update(1)
        if done % args.log_every == 0 or done == end_iter or done % args.ckpt_every == 0:
            # 7. the host sync: the window's mean over the ranks, checked before any save
            mean = (dist.all_reduce_mean(window) / window_n).tolist()
            if not np.isfinite(mean).all():
                raise TrainSegError(f"non-finite loss in iterations {done - window_n + 1}-{done}; "
                                    f"lower --lr or use --amp off, then --resume")
            dt = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            jsonl.log(iter=done, loss=mean[0], loss_terms=mean[1:], lr=lr,
                      images_per_s=window_n * args.batch_size * args.iter_size / dt,
                      sec_per_iter=dt / window_n)
            progress.set(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}")
            window.zero_()
            window_n, t0 = 0, time.perf_counter()
        if args.save_every and done % args.save_every == 0 and done != args.max_iters:
            if dist.is_main_process():
                torch_save(model.state_dict(), run_dir / f"checkpoint_{done}.pth")
        if done % args.ckpt_every == 0 or done == end_iter:
            save_training_state(run_dir / LAST_NAME, model_state=model.state_dict(),
                                optimizer=optimizer, scaler=scaler, iteration=done, args=args)
    progress.close()
    losses = torch.stack(history).tolist() if history else []
    if end_iter < args.max_iters:
        logger.info("stopped after --stop-after %d iterations at %d/%d; continue with --resume",
                    args.stop_after, end_iter, args.max_iters)
        return {"run_dir": run_dir, "final": None, "losses": losses}
    final_path = run_dir / FINAL_NAME
    if dist.is_main_process():
        # Plain state dict with "base." keys: the deeplab-pytorch checkpoint_final.pth layout.
        # Written after checkpoint_last.pth, so its presence means "finished".
        torch_save(model.state_dict(), final_path)
        logger.info("finished: %s", final_path)
    dist.barrier()
    return {"run_dir": run_dir, "final": final_path, "losses": losses}


def evaluate_after_training(args, final_path: Path) -> Dict:
    """infer_seg.py on --eval-list with the final weights (all ranks share the images)."""
    import infer_seg
    argv = ["--dataset", args.dataset, "--data_root", str(args.data_root), "--list", args.eval_list,
            "--weights", str(final_path), "--device", args.device,
            "--out-dir", str(args.run_dir / f"pred_{Path(args.eval_list).stem}"),
            "--crf" if args.eval_crf else "--no-crf",
            "--msc-scales", *[str(s) for s in args.msc_scales],
            "--num-workers", str(min(args.num_workers, 2))]
    if args.metadata_dir is not None:
        argv += ["--metadata-dir", str(args.metadata_dir)]
    return infer_seg.main(infer_seg.get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
