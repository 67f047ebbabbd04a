"""Train the baseline CAM classifier (``resnet38_cls``) or EPS (``resnet38_eps``).

    python train.py --dataset voc12 --network resnet38_eps --data-root VOC2012/JPEGImages \\
        --saliency-root VOC2012/SALImages --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \\
        --session voc12_eps --save-root runs
    torchrun --nproc_per_node 2 train.py ...     # DDP; --batch-size stays the GLOBAL batch

The published EPS main.py command line (its underscore spellings, --data_root ...) runs unchanged.

Defaults reproduce the published runs (EPS main.py and script/*.sh; docs/training.md): the
dataset's training recipe from data/registry.py, the method's hyper-parameters from its head
(network/heads.py: EPS --tau / --lam per dataset), SGD with the published parameter groups, poly
decay per step and momentum 5e-4 (the published weight-decay-as-momentum quirk, utils/optim.py),
and the losses the network's head defines (multilabel soft margin, + the EPS saliency loss for
EPS).

Run directory ``<save-root>/<session>``: args.json, env.json, log.txt, metrics.jsonl, loss.png,
``checkpoint_last.pth`` (full state for --resume) and, at the end, ``checkpoint_cls.pth`` (plain
state dict, the published name and layout for both heads, with the network recorded inside).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import random
import torch

from data.datasets import ClsDataset, ClsSalDataset, check_files, default_saliency_root
from data.registry import DATASETS, check_data_root, get_dataset
from data.saliency import check_saliency_maps
from network import HEADS, NETWORKS, build_network, network_parts, normalize_network_name
from network.heads import DeclareOnce, add_hparam_flag, flag_of
from network.weights import load_initial_weights, record_network
from utils import dist, flags
from utils.checkpoint import (changed_settings, check_ranks_agree, open_run_dir,
                              restore_training_state, save_training_state, start_run)
from utils.cli import add_flag, parent_parser, run_cli
from utils.device import (add_numerics_args, check_shared_memory, configure_numerics, pin_memory,
                          resolve_device)
from utils.errors import UserError
from utils.io import torch_save
from utils.layout import working_counts
from utils.optim import PUBLISHED_MOMENTUM, build_adamw, build_optimizer, set_poly_lr
from utils.plots import plot_losses
from utils.progress import Progress
from utils.run import JsonlLogger, close_file_log, peak_memory_mb, setup_logging, write_run_info
from utils.sampler import seeded_loader
from utils.tensorboard import open_board, summary_writer_class

logger = logging.getLogger("train")

FINAL_NAME = "checkpoint_cls.pth"   # published name, used for cls and eps alike (EPS main.py)
LAST_NAME = "checkpoint_last.pth"   # full training state, rewritten every --ckpt-every steps
# Flags whose default comes from the dataset's recipe (data/registry.py); the heads declare theirs
# (Head.hparams, network/heads.py).
RECIPE_KEYS = ("train_list", "crop_size", "resize_size", "batch_size", "max_iters", "lr", "wt_dec")


class TrainingError(UserError):
    """A run cannot start or must stop; the message says why and what to do."""


def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("EPS / baseline classifier training")
    add = functools.partial(add_flag, p)
    # --- the published main.py flags (shown hyphenated; the underscore spellings are aliases) ---
    flags.add_dataset(p, DATASETS)
    add("--train-list", type=str, default=None,
        help="id list (path or split name); default from the dataset: published "
             "metadata/voc12/train_aug.txt (10,582 ids) or metadata/coco/train.txt (82,081)")
    add("--session", type=str, default="eps",
        help="run name: the run directory is <save-root>/<session> (published default: eps)")
    add("--network", type=str, default="resnet38_cls",
        help=f"network = backbone_head: {', '.join(sorted(NETWORKS))}; the published "
             f"'network.resnet38_eps' spelling is accepted (published default: network.resnet38_cls)")
    flags.add_data_root(p, help="folder with the images (VOC: VOCdevkit/VOC2012 or its "
                                "JPEGImages/, as published; COCO: the folder holding train2014/)")
    add("--saliency-root", type=Path, default=None,
        help="folder with <id>.png saliency maps (heads that train with saliency, e.g. eps; "
             "published: PFAN maps, SALImages). Default: <dataset root>/SALImages")
    add("--save-root", type=Path, default=Path("log"),
        help="parent of the run directory (published default '/log', which needs root; ours is "
             "the relative 'log')")
    add("--weights", type=str, default=None,
        help="initial weights: the ImageNet ResNet-38 MXNet .params "
             "(ilsvrc-cls_rna-a1_cls1000_ep-0001.params, as published) or its converted .pth, a "
             "torchvision ResNet-101 .pth, or a trained checkpoint of this network and class "
             "count. 'none' (or omitted, small nets only) trains from scratch")
    add("--crop-size", type=int, default=None,
        help="random crop size (published: VOC 448, COCO 321)")
    add("--resize-size", type=int, nargs=2, default=None, metavar=("MIN_LONG", "MAX_LONG"),
        help="random resize range of the longer side (published: VOC 256 512, COCO 256 448)")
    add("--batch-size", type=int, default=None,
        help="GLOBAL batch size; with torchrun each process takes batch_size / world_size "
             "(published: VOC 8, COCO 16, over 2 GPUs with DataParallel)")
    add("--iter-size", type=int, default=1,
        help="forward/backward passes accumulated per optimizer step (gradient accumulation): "
             "--batch_size stays the global batch of one step, each pass takes 1/iter-size of "
             "it, so a GPU that cannot hold its share keeps the published batch (published: 1; "
             "the pipeline scripts' ITER_SIZE)")
    add("--lr", type=float, default=None,
        help="base learning rate of the 1x group; 2x/10x/20x groups scale it (published 0.01; "
             "a backbone with its own optimizer recipe has its own default, network/vit.py)")
    add("--wt-dec", type=float, default=None,
        help="weight decay of the weight groups (published 5e-4; a backbone with its own "
             "optimizer recipe has its own default)")
    add("--max-iters", type=int, default=None,
        help="training iterations; also the poly schedule length (published: VOC 20000, COCO 256500)")
    flags.add_num_workers(p, 8, "data loading processes per training process (published 8)")
    add_head_flags(p.add_argument_group(
        "method hyper-parameters (declared by the heads, network/heads.py; default: the "
        "head's value for --dataset)"), HEADS.values())
    # --- new flags ---
    add("--momentum", type=float, default=PUBLISHED_MOMENTUM,
        help="SGD momentum. Default 5e-4 because the published optimizer passed its weight decay "
             "into SGD's momentum slot: that is what produced the published numbers (0.9 was "
             "only the poly power). Not used by backbones whose recipe is AdamW")
    add("--warmup-iters", type=int, default=None,
        help="iterations of linear lr warmup before the poly decay (published: 0, none; default: "
             "the backbone's optimizer recipe, e.g. ViT 7.5%% of --max-iters as ToCo's 1500 of "
             "20000)")
    flags.add_seed(p)
    flags.add_resume(p, "run dir")
    flags.add_extend(p, FINAL_NAME)
    flags.add_training_amp(p)
    flags.add_channels_last(p, False, "NHWC memory layout: same math, faster convolutions on "
                                      "CPU and tensor cores")
    add("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="gradient checkpointing of the trunk: less memory, ~30%% more compute")
    flags.add_log_every(p, 50, "printed every 50")
    flags.add_ckpt_every(p, 1000, "none, EPS main.py saved only at the end")
    flags.add_stop_after(p)
    flags.add_device(p)
    flags.add_metadata_dir(p)
    flags.add_skip_missing(p, "image or saliency")
    flags.add_check_data(p, "every image's header and compare every saliency map's size with "
                            "its image (~1 ms per file)")
    flags.add_tensorboard(p)
    add("--stretch-saliency", action=argparse.BooleanOptionalAction, default=False,
        help="stretch saliency maps whose aspect ratio differs from their image's to the image "
             "instead of stopping; a deviation (published: off, and its per-file resize would "
             "misalign them). Maps at another resolution with the image's aspect ratio need no flag")
    add("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
        help="published freezing: every BN in eval mode with fixed affine, conv1a/b2* frozen. "
             "Default: on with --weights (ImageNet init, as published), off from scratch")
    add_numerics_args(p, cudnn_benchmark=False, published="off (EPS main.py)")
    dist.add_dist_args(p)
    dist.add_peer_timeout_arg(p)
    return p


def add_head_flags(group, heads) -> None:
    """One flag per hyper-parameter name over every registered head (network/heads.py HParam):
    a head that inherits or shares a name (a subclass of EpsHead: --tau, --lam) adds no second
    flag. The flag's default is None; resolve_args fills in the run's head's value for the
    dataset. The help lists each head's defaults where they differ."""
    declared: dict = {}
    for head in heads:
        for name, hp in head.hparams.items():
            declared.setdefault(name, []).append((head, hp))
    for name, decls in declared.items():
        first = decls[0][1]
        clash = [h.name for h, hp in decls if (hp.type, hp.choices) != (first.type, first.choices)]
        if clash:
            raise TypeError(f"heads {[h.name for h, _ in decls]} declare {flag_of(name)} with "
                            f"different types or choices; rename one of them")
        defaults = {hp.describe_default(): None for _, hp in decls}
        where = (first.describe_default() if len(defaults) == 1 else
                 "; ".join(f"{h.name}: {hp.describe_default()}" for h, hp in decls))
        add_hparam_flag(group, name, first, help=f"{first.help}. Default: {where}")
    # Then each head's own add_args (a subclass calling super().add_args included): on a
    # DeclareOnce, a flag declared above or by another head is not declared twice.
    once = DeclareOnce(group)
    for head in heads:
        head.add_args(once)


def resolve_args(args, info, world: int) -> argparse.Namespace:
    """Fill the shared recipe flags left at None from the dataset registry and the method's
    hyper-parameters from the head (its per-dataset defaults), and check every value (no
    compute, no files written)."""
    try:
        args.network = normalize_network_name(args.network)
    except KeyError:
        raise TrainingError(f"unknown --network {args.network!r}; choose one of "
                            f"{sorted(NETWORKS)}") from None
    backbone, head = network_parts(args.network)
    recipe = info.train_defaults
    opt = backbone.optimizer_recipe  # the backbone's own lr / weight decay, else the dataset's
    for key, value in (("lr", opt.lr), ("wt_dec", opt.weight_decay)):
        if getattr(args, key, None) is None and value is not None:
            setattr(args, key, value)
    for key in RECIPE_KEYS:
        if getattr(args, key, None) is None:
            setattr(args, key, recipe[key])
    if getattr(args, "warmup_iters", None) is None:
        args.warmup_iters = int(round(opt.warmup_fraction * args.max_iters))
    try:
        hparams = head.resolve_hparams({k: getattr(args, k, None) for k in head.hparams},
                                       info.name)
    except ValueError as e:
        raise TrainingError(f"{e} (--network {args.network})") from None
    for key, value in hparams.items():
        setattr(args, key, value)
    args.resize_size = [int(v) for v in args.resize_size]
    checks = [(args.crop_size > 0, "--crop_size must be positive"),
              (0 < args.resize_size[0] <= args.resize_size[1],
               "--resize_size needs 0 < MIN_LONG <= MAX_LONG"),
              (args.batch_size > 0, "--batch_size must be positive"),
              (args.iter_size > 0, "--iter-size must be >= 1"),
              (args.iter_size <= 0 or args.batch_size % (world * args.iter_size) == 0,
               f"--batch_size {args.batch_size} (global) cannot be split evenly over {world} "
               f"processes{f' x {args.iter_size} accumulated passes' if args.iter_size > 1 else ''}: use "
               f"{', '.join(map(str, working_counts(args.batch_size, accum=max(1, args.iter_size))))} "
               f"processes in all (the pipeline scripts choose one by default), or change "
               f"--batch_size (a deviation from the published recipe)"),
              (args.max_iters > 0, "--max_iters must be positive"),
              (0 <= args.warmup_iters < max(args.max_iters, 1),
               "--warmup-iters must be >= 0 and smaller than --max-iters"),
              # isfinite: an inf weight decay passed ">= 0" and made the loss NaN at step 2
              (all(map(math.isfinite, (args.lr, args.wt_dec, args.momentum))),
               "--lr, --wt_dec and --momentum must be finite numbers"),
              (args.lr > 0, "--lr must be positive"),
              (args.wt_dec >= 0 and args.momentum >= 0, "--wt_dec and --momentum must be >= 0"),
              (args.seed >= 0, "--seed must be >= 0"),
              (args.log_every > 0 and args.ckpt_every > 0, "--log-every/--ckpt-every must be > 0"),
              (args.num_workers >= 0, "--num_workers must be >= 0"),
              (args.stop_after is None or args.stop_after > 0, "--stop-after must be positive")]
    for ok, msg in checks:
        if not ok:
            raise TrainingError(msg)
    if args.weights is None or args.weights.lower() == "none":
        if args.weights is None and backbone.expects_pretrained:
            raise TrainingError(
                f"--network {args.network} starts from ImageNet weights: pass --weights "
                f"(published: ilsvrc-cls_rna-a1_cls1000_ep-0001.params: bash script/download.sh "
                f"weights), or "
                f"--weights none to train from scratch")
        args.weights = "none"
    if args.freeze_bn is None:
        # The published freezing (frozen BN with ImageNet statistics, frozen stem) only makes
        # sense on top of ImageNet weights; nets trained from scratch train everything.
        args.freeze_bn = backbone.default_freeze_bn and args.weights != "none"
    return args


def check_inputs(args, info, head) -> None:
    """Every input of the run at once (a missing dataset, saliency folder, weights file, list or
    label file), so that one try names all of them, each with where to get it."""
    from data.downloads import DOWNLOADS, hint
    where = lambda kind, other: hint(f"{info.name}_{kind}") if f"{info.name}_{kind}" in DOWNLOADS else other  # noqa: E731
    problems = []
    if not Path(args.data_root).is_dir():
        problems.append(f"--data_root {args.data_root}: folder not found ({where('images', 'the folder with JPEGImages/')})")
    if head.needs_saliency:
        sal = args.saliency_root or default_saliency_root(info, args.data_root)
        if not Path(sal).is_dir():
            problems.append(f"--network {args.network} trains with saliency maps: "
                            f"{'--saliency_root ' if args.saliency_root else 'the default '}{sal} "
                            f"is not a folder ({where('saliency', 'one <id>.png per image')})")
    if args.weights != "none" and not Path(args.weights).is_file():
        problems.append(f"--weights {args.weights}: file not found ({hint('imagenet_resnet38')}; "
                        f"or --weights none to train from scratch)")
    for check in (lambda: info.list_path(args.train_list), lambda: info.image_labels):
        try:
            check()
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise TrainingError(f"{len(problems)} input(s) missing: " + "; ".join(problems))


def saliency_source(dataset: str) -> str:
    """Where a dataset's saliency maps come from (data/downloads.py), for error messages."""
    from data.downloads import DOWNLOADS, hint
    key = f"{dataset}_saliency"
    return hint(key) if key in DOWNLOADS else ("one saliency map <id>.png per image: "
                                               "tools/make_saliency.py makes them "
                                               "(docs/custom-data.md)")


def build_dataset(args, info, head):
    """The training set of the head's method: images (+ saliency maps when it needs them), +
    what the head's ``sample_extras`` hook adds to each sample."""
    dataset = _build_dataset(args, info, head)
    if head.sample_extras is not None:
        # a static or class method of the head: loader workers run it, without the model
        dataset.sample_extras = head.sample_extras
        dataset.sample_hparams = {k: getattr(args, k) for k in head.hparams}
    return dataset


def _build_dataset(args, info, head):
    common = dict(crop_size=args.crop_size, resize_size=args.resize_size,
                  skip_missing=args.skip_missing)
    if not head.needs_saliency:
        dataset = ClsDataset(info, args.data_root, args.train_list, **common)
        if args.check_data:  # header reads on rank 0: a bad image stops every rank before any compute
            dist.check_on_main(lambda: check_files(dataset.ids, dataset.image_paths))
        return dataset
    sal_root = args.saliency_root or default_saliency_root(info, args.data_root)
    if not Path(sal_root).is_dir():
        raise TrainingError(f"--network {args.network} trains with saliency maps: "
                            f"{'--saliency_root ' if args.saliency_root else 'the default '}"
                            f"{sal_root} is not a folder ({saliency_source(info.name)})")
    dataset = ClsSalDataset(info, args.data_root, sal_root, args.train_list,
                            stretch_saliency=args.stretch_saliency, **common)
    if args.check_data:  # header reads on rank 0: a bad map stops every rank before any compute
        dataset.map_report = dist.check_on_main(
            lambda: check_saliency_maps(dataset, args.stretch_saliency, log=False, progress=True))
    return dataset


def main(args):
    # 1. device, dataset, settings: every check before anything is written or computed
    device = resolve_device(args.device, dist.get_local_rank())
    numerics = configure_numerics(device, tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark,
                                  amp=args.amp)
    dist.init_distributed(device, args.dist_timeout, args.peer_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    check_data_root(args.data_root, "--data_root")
    info = get_dataset(args.dataset, args.metadata_dir, args.data_root)
    args = resolve_args(args, info, world)
    check_inputs(args, info, network_parts(args.network)[1])
    if args.tensorboard:
        summary_writer_class()  # a missing package is one line now, not after the first steps
    check_shared_memory(args.num_workers)
    run_dir = Path(args.save_root) / args.session
    run = start_run(run_dir, resume=args.resume, final_name=FINAL_NAME, last_name=LAST_NAME,
                    expect={"network": args.network, "dataset": args.dataset}, writer="train.py",
                    max_iters=args.max_iters, extend=args.extend, dir_flag="--session/--save_root",
                    iters_flag="--max_iters", root_flag="--save_root")
    if run.finished:
        logger.info("%s is finished (iteration %d); nothing to do", run_dir, run.start_iter)
        return run_dir
    ckpt, start_iter = run.ckpt, run.start_iter

    # 2. model (same seed on every rank; DDP also broadcasts rank 0's weights)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_network(args.network, info.num_classes, freeze_bn=args.freeze_bn,
                          checkpointing=args.checkpointing)
    if args.weights != "none" and ckpt is None:
        load_initial_weights(model, args.weights)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    # 3. data (the file checks run here, still before the run directory exists)
    dataset = build_dataset(args, info, model)
    loader = seeded_loader(dataset, global_batch=args.batch_size, seed=args.seed,
                           start_batch=start_iter, rank=rank, world_size=world,
                           num_workers=args.num_workers, pin_memory=pin_memory(device),
                           accum=args.iter_size)

    # 4. run directory
    open_run_dir(run_dir, FINAL_NAME, start_iter)
    setup_logging(run_dir / "log.txt")
    try:
        write_run_info(run_dir, args, numerics=numerics)
        logger.info("%s", dataset)
        if getattr(dataset, "map_report", None) is not None:
            logger.info("%s", dataset.map_report.summary())
        logger.info("run directory %s; %d process(es) on %s; per-process batch %d", run_dir,
                    world, device, args.batch_size // (world * args.iter_size))
        if args.iter_size > 1:
            logger.info("batch %d = %d per process x %d processes x %d accumulated passes",
                        args.batch_size, args.batch_size // (world * args.iter_size), world,
                        args.iter_size)
        return train(args, model, loader, ckpt, run_dir, device, run.resume)
    finally:  # in-process callers (tests, pipelines) must not keep logging into this run's file
        close_file_log(run_dir / "log.txt")


def cam_overlays(model, img: torch.Tensor, label: torch.Tensor, num: int = 4) -> np.ndarray:
    """--tensorboard: the CAMs of the first ``num`` images of a training batch as heat overlays,
    uint8 (N, H, W, 3): one view through the inference math (network/cam.py: the head's
    cam_probs, label mask, per-class max normalisation), the strongest present class per pixel.
    Eval mode without gradients and back: no random draw, no BN statistic, no weight changes."""
    from data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from network import cam as camlib
    from utils.vis import blend, heatmap

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = model.forward_cam(img[:num].float())
    finally:
        model.train(was_training)
    size = tuple(img.shape[-2:])
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    out = []
    for r, y, x in zip(raw.float(), label, img):
        fg, bg, n = camlib.combine_views_reference([(r, False)], size, y.float(), model)
        keys, cams, _ = camlib.finalize(fg, bg, n, y.float())
        heat = cams.amax(0) if len(keys) else torch.zeros(size)
        rgb = ((x.float().cpu().permute(1, 2, 0).numpy() * std + mean).clip(0, 1) * 255).round()
        out.append(blend(rgb.astype(np.uint8), heatmap(heat.cpu().numpy()), 0.5))
    return np.stack(out)


def train(args, model, loader, ckpt, run_dir: Path, device: torch.device, resume_path=None) -> Path:
    # 5. optimizer (published: built before train() freezes layers; frozen params get no grad)
    recipe = model.optimizer_recipe  # network/base.py: the published SGD unless the backbone says
    if recipe.name == "sgd":
        optimizer = build_optimizer(model.get_parameter_groups(), args.lr, args.wt_dec,
                                    args.momentum)
    elif recipe.name == "adamw":
        optimizer = build_adamw(model.get_parameter_groups(), args.lr, args.wt_dec,
                                betas=recipe.betas, eps=recipe.eps)
    else:
        raise ValueError(f"{type(model).__name__}: unknown optimizer {recipe.name!r} in its recipe")
    if recipe.name != "sgd" or args.warmup_iters:
        logger.info("optimizer %s, lr %g, weight decay %g, warmup %d iterations (%s)",
                    recipe.name, args.lr, args.wt_dec, args.warmup_iters, recipe.source)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    model.train()  # the published freezing (BN eval, conv1a/b2* frozen) when requested
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s (%d classes, freeze_bn=%s): %.2fM trainable parameters", args.network,
                model.num_classes, args.freeze_bn, n_train / 1e6)
    # 6. restore, else give each rank its own dropout stream
    torch.manual_seed(args.seed + 1 + dist.get_rank())
    start_iter = 0
    if ckpt:
        start_iter = restore_training_state(ckpt, model=model, optimizer=optimizer, scaler=scaler,
                                            seed=args.seed)
        changed = changed_settings(ckpt, args, RECIPE_KEYS + tuple(model.hparams))
        if changed:
            logger.warning("resuming with changed settings (checkpoint -> now): %s", changed)
        logger.info("resumed from %s at iteration %d", resume_path, start_iter)
        # the loaded tensors are a second copy of model + optimizer state: free them for the run
        ckpt.clear()
    board = open_board(args.tensorboard, run_dir, start_iter, dist.is_main_process())
    metrics = JsonlLogger(run_dir / "metrics.jsonl", mirror=board)  # --tensorboard: same records
    metrics.trim(start_iter)  # drop records a killed run wrote after its last checkpoint
    try:
        return _loop(args, model, optimizer, scaler, loader, metrics, board, run_dir, device,
                     start_iter, recipe)
    finally:
        if board is not None:
            board.close()


def _loop(args, model, optimizer, scaler, loader, metrics, board, run_dir: Path,
          device: torch.device, start_iter: int, recipe) -> Path:
    """7-9: the training loop, the checkpoints and the end of the run."""
    hparams = {k: getattr(args, k) for k in model.hparams}
    net = dist.wrap_ddp(model, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    end_iter = min(args.max_iters, start_iter + (args.stop_after or args.max_iters))
    # Loss statistics stay on the device between log steps: no host sync in the loop.
    window, window_n, t_window, terms = None, 0, time.perf_counter(), None
    loader_iter, last_good = iter(loader), None
    progress = Progress(args.max_iters, f"train {args.session}", initial=start_iter,
                        enabled=dist.is_main_process())

    def step():
        scaler.step(optimizer)
        scaler.update()

    # 7. the loop. The head's hooks (network/heads.py): sample_extras adds a dict as the last
    #    entry of each batch, handed to losses as extras=; around_step runs step() with what the
    #    method does around it. Without them this is the published step, bit for bit.
    has_extras = model.sample_extras is not None
    for it in range(start_iter, end_iter):
        # poly lr of this 0-based step, before the optimizer step (after a warmup, if any)
        lr = set_poly_lr(optimizer, it, args.max_iters, warmup_iters=args.warmup_iters,
                         warmup_ratio=recipe.warmup_ratio)
        for micro in range(args.iter_size):  # published: one pass (--iter-size 1)
            batch = next(loader_iter)  # an endless sampler: never StopIteration
            extra = {}
            if has_extras:
                batch, extras = batch[:-1], batch[-1]
                extra = {"extras": {k: v.to(device, non_blocking=True) if torch.is_tensor(v)
                                    else v for k, v in extras.items()}}
            img = batch[1].to(device, non_blocking=True).contiguous(memory_format=fmt)
            label = batch[-1].to(device, non_blocking=True)
            sal = batch[2].to(device, non_blocking=True) if model.needs_saliency else None
            # DDP all-reduces the gradients on the last pass only
            sync = net is model or micro == args.iter_size - 1
            with contextlib.nullcontext() if sync else net.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = net(img)
                losses = model.losses(out, label, sal, **extra, **hparams)  # head's terms, fp32
                loss = sum(losses.values())
                if micro == 0:
                    optimizer.zero_grad(set_to_none=True)
                # Every head's terms are means over the images of the pass, so the mean of the
                # passes' losses is the loss of the whole batch (network/losses.py)
                scaler.scale(loss / args.iter_size if args.iter_size > 1 else loss).backward()
            terms = terms or list(losses)
            part = torch.stack([loss.detach().float()] + [losses[k].detach().float() for k in terms])
            stats = part if micro == 0 else stats + part
        if args.iter_size > 1:
            stats = stats / args.iter_size
        if model.around_step is None:
            step()
        else:
            model.around_step(step, it, **hparams)
        window = stats if window is None else window + stats
        window_n, done = window_n + 1, it + 1
        progress.update(1)
        if (done % args.log_every == 0 or done == end_iter or done % args.ckpt_every == 0
                or it == start_iter):
            # 8. the only host sync: the mean over the window and the ranks, checked for NaN/inf
            #    before anything is saved (the published loop checked nothing)
            mean = (dist.all_reduce_mean(window) / window_n).tolist()
            if not np.isfinite(mean).all():
                raise TrainingError(
                    f"non-finite loss in iterations {done - window_n + 1}-{done} "
                    f"({dict(zip(['loss'] + terms, mean))}); training stopped. Last good "
                    f"checkpoint: {last_good or 'none written in this run'}. Lower --lr, or use "
                    f"--amp off, then --resume")
            dt = time.perf_counter() - t_window
            rec = dict(iter=done, loss=mean[0], **{f"loss_{k}": v for k, v in zip(terms, mean[1:])},
                       lr=lr, images_per_s=window_n * args.batch_size / dt,
                       sec_per_iter=dt / window_n, mem_mb=peak_memory_mb(device))
            metrics.log(**rec)
            progress.set(loss=f"{mean[0]:.4f}", lr=f"{lr:.2e}")
            logger.info("iter %d/%d loss %.4f (%s) lr %.3e %.1f img/s mem %.0f MB | ETA %s", done,
                        args.max_iters, mean[0], " ".join(f"{k} {v:.4f}" for k, v in
                                                          zip(terms, mean[1:])),
                        lr, rec["images_per_s"], rec["mem_mb"], progress.eta())
            progress.mark()
            window, window_n, t_window = None, 0, time.perf_counter()
        if done % args.ckpt_every == 0 or done == end_iter:
            save_training_state(run_dir / LAST_NAME, model_state=record_network(
                model.state_dict(), model), optimizer=optimizer, scaler=scaler, iteration=done,
                args=args)
            last_good = run_dir / LAST_NAME
            if board is not None:
                board.images("cams", cam_overlays(model, img, label), done)
    progress.close()

    # 9. the end: the published plain state dict, written after checkpoint_last.pth, so its
    #    presence means "finished"; the network is recorded inside it (network/weights.py)
    if end_iter < args.max_iters:
        logger.info("stopped after --stop-after %d iterations at %d/%d; continue with --resume",
                    args.stop_after, end_iter, args.max_iters)
        return run_dir
    if dist.get_world_size() > 1:
        check_ranks_agree(model)
    if dist.is_main_process():
        torch_save(record_network(model.state_dict(), model), run_dir / FINAL_NAME)
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png",
                    title=f"{args.session} ({args.network})")
        logger.info("finished: %s", run_dir / FINAL_NAME)
    dist.barrier()
    return run_dir


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
