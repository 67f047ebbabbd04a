"""Train the baseline CAM classifier (``resnet38_cls``) or EPS (``resnet38_eps``).

    python train.py --dataset voc12 --network resnet38_eps --data_root VOC2012/JPEGImages \
        --saliency_root VOC2012/SALImages --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --session voc12_eps --save_root runs
    torchrun --nproc_per_node 2 train.py ...     # DDP; --batch_size stays the GLOBAL batch

Defaults reproduce the published runs (reference.md 1.2, 1.3, 1.7-1.9): per-dataset recipe from
the dataset registry, SGD with the published groups, poly decay per step and momentum 5e-4 (the
published weight-decay-as-momentum quirk), multilabel soft margin loss (+ EPS saliency loss).

Run directory ``<save_root>/<session>``: args.json, env.json, log.txt, metrics.jsonl, loss.png,
``checkpoint_last.pth`` (full state for --resume) and, at the end, ``checkpoint_cls.pth`` (plain
state dict, published name and layout, for both heads).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import random
import resource
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.datasets import ClsDataset, ClsSalDataset, DataError, default_saliency_root
from data.metadata import MetadataError
from data.registry import DATASETS, get_dataset
from data.saliency import check_saliency_maps
from network import NETWORKS, build_network, normalize_network_name
from network.losses import cls_loss, eps_loss
from network.weights import (WeightsError, describe_checkpoint, load_pretrained,
                             load_state_dict_file, load_weights)
from utils import dist as du
from utils.io import atomic_path, torch_save
from utils.optim import PUBLISHED_MOMENTUM, build_optimizer, set_poly_lr
from utils.run import (JsonlLogger, RunDirError, resolve_resume, setup_logging, trim_metrics,
                       write_run_info)

logger = logging.getLogger(__name__)

FINAL_NAME = "checkpoint_cls.pth"   # published name, used for cls and eps alike (reference 1.2)
LAST_NAME = "checkpoint_last.pth"   # full training state, rewritten every --ckpt-every steps
# Flags whose default comes from the dataset registry (published recipe, reference 1.3).
RECIPE_KEYS = ("train_list", "crop_size", "resize_size", "batch_size", "max_iters", "lr", "wt_dec",
               "tau", "lam")


class TrainingError(RuntimeError):
    """A run cannot start or must stop; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a mistyped flag (--max_iter) must be an error, not a prefix match. A
    # parser built with parents=[this] needs allow_abbrev=False too (argparse does not inherit it).
    p = argparse.ArgumentParser("EPS / baseline classifier training", add_help=False,
                                allow_abbrev=False)
    add = p.add_argument
    bool_flag = argparse.BooleanOptionalAction
    # --- the published main.py flags (underscored names; hyphenated aliases) ---
    add("--dataset", type=str, default="voc12", choices=sorted(DATASETS),
        help="dataset registry entry: voc12 (20 classes), coco (80) or custom (VOC layout, "
             "metadata in the dataset root or --metadata-dir); published: voc12 / coco")
    add("--train_list", "--train-list", type=str, default=None,
        help="id list (path or split name); default from the dataset: published "
             "metadata/voc12/train_aug.txt (10,582 ids) or metadata/coco/train.txt (82,081)")
    add("--session", type=str, default="eps",
        help="run name: the run directory is <save_root>/<session> (published default: eps)")
    add("--network", type=str, default="resnet38_cls",
        help=f"network: {', '.join(sorted(NETWORKS))}; the published 'network.resnet38_eps' "
             f"spelling is accepted (published default: network.resnet38_cls)")
    add("--data_root", "--data-root", type=Path, required=True,
        help="folder with the images (VOC: VOCdevkit/VOC2012 or its JPEGImages/; COCO: the "
             "folder holding train2014/)")
    add("--saliency_root", "--saliency-root", type=Path, default=None,
        help="folder with <id>.png saliency maps (eps heads only; published: PFAN maps, "
             "SALImages). Default: <dataset root>/SALImages when it exists")
    add("--save_root", "--save-root", type=Path, default=Path("log"),
        help="parent of the run directory (published default '/log', which needs root; ours is "
             "the relative 'log')")
    add("--weights", type=str, default=None,
        help="initial weights: the ImageNet ResNet-38 MXNet .params "
             "(ilsvrc-cls_rna-a1_cls1000_ep-0001.params, as published) or its converted .pth, a "
             "torchvision ResNet-101 .pth, or a trained checkpoint with the right class count. "
             "'none' (or omitted, small nets only) trains from scratch")
    add("--crop_size", "--crop-size", type=int, default=None,
        help="random crop size (published: VOC 448, COCO 321)")
    add("--resize_size", "--resize-size", type=int, nargs=2, default=None,
        metavar=("MIN_LONG", "MAX_LONG"),
        help="random resize range of the longer side (published: VOC 256 512, COCO 256 448)")
    add("--batch_size", "--batch-size", type=int, default=None,
        help="GLOBAL batch size; with torchrun each process takes batch_size / world_size "
             "(published: VOC 8, COCO 16, over 2 GPUs with DataParallel)")
    add("--lr", type=float, default=None,
        help="base learning rate of the 1x group; 2x/10x/20x groups scale it (published 0.01)")
    add("--wt_dec", "--wt-dec", type=float, default=None,
        help="weight decay of the weight groups (published 5e-4)")
    add("--max_iters", "--max-iters", type=int, default=None,
        help="training iterations; also the poly schedule length (published: VOC 20000, COCO 256500)")
    add("--num_workers", "--num-workers", type=int, default=8,
        help="data loading processes per training process (published 8)")
    add("--tau", type=float, default=None,
        help="EPS overlap-ratio threshold for foreground classes (published scripts: 0.4; "
             "main.py default 0.5)")
    add("--lam", type=float, default=None,
        help="EPS weight of the foreground map in the predicted saliency (published: VOC 0.5, "
             "COCO 0.9)")
    # --- new flags ---
    add("--momentum", type=float, default=PUBLISHED_MOMENTUM,
        help="SGD momentum. Default 5e-4 because the published optimizer passed its weight decay "
             "into SGD's momentum slot: that is what produced the published numbers (0.9 was "
             "only the poly power)")
    add("--seed", type=int, default=0,
        help="seed of initialisation, data order, augmentation and dropout (the published code "
             "set no seed)")
    add("--resume", type=str, nargs="?", const="auto", default=None, metavar="CKPT",
        help="continue from a checkpoint: without a value, <run dir>/checkpoint_last.pth "
             "(starting fresh if there is none); or a path to a checkpoint_last-style file")
    add("--amp", type=str, default="off", choices=["off", "bf16", "fp16"],
        help="mixed precision (CUDA; bf16 also on CPU). Published: off (fp32)")
    add("--channels-last", action=bool_flag, default=False,
        help="NHWC memory layout: same math, faster convolutions on CPU and tensor cores")
    add("--checkpointing", action=bool_flag, default=False,
        help="gradient checkpointing of the trunk: less memory, ~30%% more compute")
    add("--log-every", "--log_every", type=int, default=50,
        help="iterations between metrics records (published printed every 50)")
    add("--ckpt-every", "--ckpt_every", type=int, default=1000,
        help="iterations between checkpoint_last.pth rewrites (the published code saved only "
             "at the end)")
    add("--stop-after", "--stop_after", type=int, default=None,
        help="stop with a checkpoint after this many iterations of this invocation (for "
             "time-limited job slots); --resume continues")
    add("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
        help="auto = CUDA when available")
    add("--metadata-dir", "--metadata_dir", type=Path, default=None,
        help="folder with labels.txt, image_labels.txt and the id lists (default: the "
             "repository's metadata/<dataset>, or the dataset root for --dataset custom)")
    add("--skip-missing", action=bool_flag, default=False,
        help="drop listed ids whose image or saliency file is missing instead of stopping")
    add("--check-data", action=bool_flag, default=True,
        help="before training, compare every saliency map's size with its image (header reads, "
             "~1 ms per file)")
    add("--stretch-saliency", action=bool_flag, default=False,
        help="stretch saliency maps whose aspect ratio differs from their image's to the image "
             "instead of stopping; a deviation (published: off, and its per-file resize would "
             "misalign them). Maps at another resolution with the image's aspect ratio need no flag")
    add("--freeze-bn", action=bool_flag, default=None,
        help="published freezing: every BN in eval mode with fixed affine, conv1a/b2* frozen. "
             "Default: on with --weights (ImageNet init, as published), off from scratch")
    return p


def resolve_args(args, info) -> argparse.Namespace:
    """Fill recipe flags left at None from the dataset registry and check values (no compute)."""
    defaults = info.train_defaults
    for key in RECIPE_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.resize_size = [int(v) for v in args.resize_size]
    try:
        args.network = normalize_network_name(args.network)
    except KeyError:
        raise TrainingError(f"unknown --network {args.network!r}; choose one of "
                            f"{sorted(NETWORKS)}") from None
    checks = [(args.crop_size > 0, "--crop_size must be positive"),
              (0 < args.resize_size[0] <= args.resize_size[1],
               "--resize_size needs 0 < MIN_LONG <= MAX_LONG"),
              (args.batch_size > 0, "--batch_size must be positive"),
              (args.max_iters > 0, "--max_iters must be positive"),
              (args.lr > 0, "--lr must be positive"),
              (args.wt_dec >= 0 and args.momentum >= 0, "--wt_dec and --momentum must be >= 0"),
              (0 <= args.tau <= 1 and 0 <= args.lam <= 1, "--tau and --lam must be in [0, 1]"),
              (args.seed >= 0, "--seed must be >= 0"),
              (args.log_every > 0 and args.ckpt_every > 0, "--log-every/--ckpt-every must be > 0"),
              (args.num_workers >= 0, "--num_workers must be >= 0"),
              (args.stop_after is None or args.stop_after > 0, "--stop-after must be positive")]
    for ok, msg in checks:
        if not ok:
            raise TrainingError(msg)
    if args.weights is None or args.weights.lower() == "none":
        if args.weights is None and NETWORKS[args.network].expects_pretrained:
            raise TrainingError(
                f"--network {args.network} starts from ImageNet weights: pass --weights "
                f"(published: ilsvrc-cls_rna-a1_cls1000_ep-0001.params), or --weights none to "
                f"train from scratch")
        args.weights = "none"
    if args.freeze_bn is None:
        # The published freezing (frozen BN with ImageNet statistics, frozen stem) only makes
        # sense on top of ImageNet weights; nets trained from scratch train everything.
        args.freeze_bn = NETWORKS[args.network].default_freeze_bn and args.weights != "none"
    return args


# ---------------------------------------------------------------------------------------------
# Data: infinite, seeded, resumable, sharded
# ---------------------------------------------------------------------------------------------
class InfiniteBatchSampler(Sampler):
    """Yields this rank's share of global batch t = start, start+1, ... forever.

    Epoch e is a permutation seeded by (seed, e); global batch t is slice k = t mod
    (n // global_batch) of epoch t // (n // global_batch) (shuffle + drop_last, as published);
    rank r takes the r-th contiguous sub-slice, so the union over ranks is exactly the global
    batch a single process would draw. The state is the iteration number alone, so resume is
    exact. Items are (index, epoch) pairs for per-sample augmentation seeds."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise TrainingError(f"--batch_size {global_batch} is not divisible by the "
                                f"{world_size} processes")
        if num_samples < global_batch:
            raise TrainingError(f"the training list has {num_samples} usable images, fewer than "
                                f"one batch of {global_batch}; lower --batch_size")
        self.n, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_iter, self.rank = start_iter, rank
        self.per_rank = global_batch // world_size
        self.steps_per_epoch = num_samples // global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def batch(self, it: int) -> List[tuple]:
        epoch, k = divmod(it, self.steps_per_epoch)
        lo = k * self.global_batch + self.rank * self.per_rank
        return [(int(i), epoch) for i in self.permutation(epoch)[lo:lo + self.per_rank]]

    def __iter__(self) -> Iterator[List[tuple]]:
        it, epoch, perm = self.start_iter, None, None
        while True:
            e, k = divmod(it, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            lo = k * self.global_batch + self.rank * self.per_rank
            yield [(int(i), epoch) for i in perm[lo:lo + self.per_rank]]
            it += 1


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random augmentation (Python ``random``, numpy and torch RNGs,
    as the published transforms use them) under a seed made of (seed, epoch, index), then
    restores the RNG states. Samples are therefore the same in any worker, after a resume and
    under any world size, and the training process's own RNG (dropout) is left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = np.random.SeedSequence([self.seed, epoch, index]).generate_state(3)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(int(s[0]))
                np.random.seed(int(s[1]))
                torch.manual_seed(int(s[2]))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def build_train_data(args, info, head_type: str, start_iter: int):
    common = dict(crop_size=args.crop_size, resize_size=args.resize_size,
                  skip_missing=args.skip_missing)
    if head_type == "eps":
        sal_root = args.saliency_root
        if sal_root is None:
            sal_root = default_saliency_root(info, args.data_root)
            if not sal_root.is_dir():
                raise TrainingError(f"--network {args.network} needs saliency maps: pass "
                                    f"--saliency_root (no {sal_root} folder either)")
            logger.info("saliency maps: %s (default location)", sal_root)
        elif not Path(sal_root).is_dir():
            raise TrainingError(f"--saliency_root {sal_root} is not a folder")
        dataset = ClsSalDataset(info, args.data_root, sal_root, args.train_list,
                                stretch_saliency=args.stretch_saliency, **common)
        if args.check_data:
            check_saliency_maps(dataset, args.stretch_saliency, progress=du.is_main_process())
    else:
        dataset = ClsDataset(info, args.data_root, args.train_list, **common)
    logger.info("%s", dataset)
    sampler = InfiniteBatchSampler(len(dataset), args.batch_size, args.seed, start_iter,
                                   du.get_rank(), du.get_world_size())
    # The loader's own generator (worker base seeds) is separate from the global torch RNG, so
    # creating the iterator does not shift the dropout stream (needed for exact resume).
    loader = DataLoader(SeededSamples(dataset, args.seed), batch_sampler=sampler,
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(args.seed))
    return dataset, loader


# ---------------------------------------------------------------------------------------------
# Model and weights
# ---------------------------------------------------------------------------------------------
def load_initial_weights(model, args, num_classes: int) -> None:
    """ImageNet initialisation (head missing, as published) or a checkpoint whose head must have
    this dataset's class count; every mismatch is an error before training starts."""
    path = Path(args.weights)
    if not path.is_file():
        raise TrainingError(f"--weights {path}: file not found")
    if path.suffix == ".params":  # the published ImageNet ResNet-38 file
        load_pretrained(model, path)
        return
    sd = load_state_dict_file(path)
    desc = describe_checkpoint(sd, num_classes)
    if desc["fc8_outputs"] is None:  # no head: an ImageNet trunk, fc8 starts from xavier
        load_pretrained(model, path)
        return
    expected = num_classes + (1 if model.head_type == "eps" else 0)
    if desc["fc8_outputs"] != expected:
        raise TrainingError(
            f"--weights {path}: {desc['summary']}; but --network {args.network} on --dataset "
            f"{args.dataset} ({num_classes} classes) needs fc8 with {expected} outputs. Pass the "
            f"ImageNet weights, or a checkpoint trained for this dataset and head")
    load_weights(model, sd)  # fine-tuning a trained classifier: strict, head included
    logger.info("initialised from the trained checkpoint %s", path)


def build_model(args, num_classes: int, device: torch.device, init_weights: bool = True):
    """The registry network, initialised from --weights (skipped when a checkpoint follows)."""
    from_scratch = args.weights == "none"
    model = build_network(args.network, num_classes, freeze_bn=args.freeze_bn,
                          checkpointing=args.checkpointing)
    if not from_scratch and init_weights:
        load_initial_weights(model, args, num_classes)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# ---------------------------------------------------------------------------------------------
def rng_state() -> Dict:
    """This process's RNG states, as tensors/lists that torch.load(weights_only=True) reads."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["state"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> List[Dict]:
    """RNG states of every rank (rank order), so each rank resumes its own dropout stream."""
    mine = rng_state()
    if not du.is_dist():
        return [mine]
    states = [None] * du.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def json_args(args) -> Dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def save_checkpoint(path: Path, model, optimizer, scaler, it: int, args) -> None:
    states = gather_rng_states()  # collective: every rank calls save_checkpoint
    if du.is_main_process():
        torch_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "iter": it, "rng": states,
                    "world_size": du.get_world_size(), "args": json_args(args)}, path)
    du.barrier()


CKPT_KEYS = ("model", "optimizer", "scaler", "iter", "rng", "args")


def load_checkpoint(path: Path, network: str) -> Dict:
    """A checkpoint_last.pth written by this script, for the same network."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            zipfile.BadZipFile) as e:
        raise TrainingError(f"cannot read checkpoint {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or not a "
                            f"train.py checkpoint") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CKPT_KEYS):
        raise TrainingError(f"{path} is not a train.py checkpoint (expected the entries "
                            f"{', '.join(CKPT_KEYS)}); to start from plain weights use --weights")
    if ckpt["args"].get("network") != network:
        raise TrainingError(f"{path} was trained with --network {ckpt['args'].get('network')}, "
                            f"not {network}")
    return ckpt


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Loss curves (total, cls, sal) from metrics.jsonl as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    its = [r["iter"] for r in recs]
    for key in ("loss", "loss_cls", "loss_sal"):
        if key in recs[0]:
            ax.plot(its, [r[key] for r in recs], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def weights_digest(model) -> str:
    """sha1 of every parameter and buffer (bitwise)."""
    import hashlib
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(model) -> None:
    """DDP keeps replicas identical (same all-reduced gradients, same updates); verify it."""
    digests = [None] * du.get_world_size()
    dist.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) == 1:
        logger.info("weights identical on all %d ranks (sha1 %s)", len(digests), digests[0][:12])
    else:
        logger.error("weights differ between ranks: %s", digests)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def compute_losses(model, batch, head_type: str, args, device, autocast):
    """One forward pass; returns (loss_cls, loss_sal, total). Published: loss = cls + sal."""
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    img = batch[1].to(device, non_blocking=True).contiguous(memory_format=mf)
    label = batch[-1].to(device, non_blocking=True)
    with autocast:
        out = model(img)
    if head_type == "eps":
        pred, cam = out
        sal = batch[2].to(device, non_blocking=True)
        # The background channel (last) has no image label: the cls loss covers classes only.
        loss_c = cls_loss(pred[:, :-1].float(), label)
        loss_s = eps_loss(cam, sal, label, args.tau, args.lam)
    else:
        loss_c = cls_loss(out.float(), label)
        loss_s = torch.zeros((), device=device)
    return loss_c, loss_s, loss_c + loss_s


def main(args):
    device = du.init_distributed(args.device)
    if args.device == "cuda" and device.type != "cuda":
        raise TrainingError("--device cuda but CUDA is not available")
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs CUDA (use --amp bf16 on the CPU)")
    info = get_dataset(args.dataset, args.metadata_dir, args.data_root)
    args = resolve_args(args, info)
    info.list_path(args.train_list)  # a wrong list is an error before the run directory exists
    run_dir = Path(args.save_root) / args.session
    resume_path = resolve_resume(run_dir, args.resume, FINAL_NAME, LAST_NAME,
                                 dir_flag="--session/--save_root")
    if du.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()
    setup_logging(run_dir / "log.txt")
    try:
        write_run_info(run_dir, args)
        return train(args, info, run_dir, resume_path, device)
    finally:  # in-process callers (tests, pipelines) must not keep logging into this run's file
        close_file_log(run_dir / "log.txt")


def close_file_log(path: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "baseFilename", None) == str(Path(path).resolve()):
            root.removeHandler(h)
            h.close()


def train(args, info, run_dir: Path, resume_path: Optional[Path], device: torch.device) -> Path:
    rank, world = du.get_rank(), du.get_world_size()
    logger.info("run directory %s; %d process(es) on %s; per-process batch %d", run_dir, world,
                device, args.batch_size // max(world, 1))
    # Published: cudnn.benchmark False (reference 5, trap 9).
    torch.backends.cudnn.benchmark = False

    # Same seed on every rank for the initialisation (DDP also broadcasts rank 0's weights).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(resume_path, args.network) if resume_path is not None else None
    model = build_model(args, info.num_classes, device, init_weights=ckpt is None)
    head_type = model.head_type
    start_iter = int(ckpt["iter"]) if ckpt else 0
    if ckpt:
        unwrap(model).load_state_dict(ckpt["model"])
        old = ckpt.get("args", {})
        changed = {k: (old.get(k), json_args(args)[k]) for k in RECIPE_KEYS + ("network", "dataset")
                   if k in old and old.get(k) != json_args(args)[k]}
        if changed:
            logger.warning("resuming with changed settings (checkpoint -> now): %s", changed)
    _, loader = build_train_data(args, info, head_type, start_iter)

    optimizer = build_optimizer(model.get_parameter_groups(), args.lr, args.wt_dec, args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    model.train()  # applies the published freezing (BN eval, conv1a/b2* frozen) when requested
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s (%s head, %d classes, freeze_bn=%s): %.2fM trainable parameters",
                args.network, head_type, info.num_classes, args.freeze_bn, n_train / 1e6)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Each rank has its own dropout stream; a resume restores exactly the saved one.
    torch.manual_seed(args.seed + 1 + rank)
    if ckpt:
        states = ckpt["rng"]
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            logger.warning("checkpoint was written by %d processes, now %d: dropout RNG reseeded",
                           len(states), world)
            torch.manual_seed(args.seed + 1 + rank + 7919 * start_iter)
        logger.info("resumed from %s at iteration %d", resume_path, start_iter)
    metrics = JsonlLogger(run_dir / "metrics.jsonl")
    if du.is_main_process():
        if ckpt:
            trim_metrics(run_dir / "metrics.jsonl", start_iter)
        elif (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # from a run that died before its first checkpoint

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    last_good = resume_path
    end_iter = args.max_iters if args.stop_after is None else min(args.max_iters,
                                                                  start_iter + args.stop_after)
    window = torch.zeros(3, dtype=torch.float64)
    window_n, t_window = 0, time.perf_counter()
    loader_iter = iter(loader)
    with contextlib.ExitStack() as stack:
        if du.is_main_process():  # log lines above the progress bar, not inside it
            stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(tqdm(total=args.max_iters, initial=start_iter, desc=args.session,
                                       dynamic_ncols=True, mininterval=2.0,
                                       disable=not du.is_main_process()))
        for it in range(start_iter, end_iter):
            batch = next(loader_iter)  # infinite sampler: never StopIteration
            # 1. poly lr of this 0-based step, set before the SGD step (published order)
            lr = set_poly_lr(optimizer, it, args.max_iters)
            # 2. forward, losses
            loss_c, loss_s, loss = compute_losses(model, batch, head_type, args, device, autocast)
            stats = torch.stack([loss_c.detach(), loss_s.detach(), loss.detach()]).double()
            if world > 1:  # every rank sees the same (mean) values, so all stop together
                dist.all_reduce(stats)
                stats /= world
            stats = stats.cpu()
            # 3. a non-finite loss stops the run before it reaches the weights
            if not torch.isfinite(stats).all():
                raise TrainingError(
                    f"non-finite loss at iteration {it} (cls {stats[0]:.4g}, sal "
                    f"{stats[1]:.4g}); training stopped. Last good checkpoint: "
                    f"{last_good or 'none written yet'}. Lower --lr, or use --amp off, then --resume")
            # 4. backward and SGD step
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            window += stats
            window_n += 1
            done = it + 1
            bar.update(1)
            if done % args.log_every == 0 or done == end_iter or it == start_iter:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t_window
                mean = (window / window_n).tolist()
                rec = dict(iter=done, loss_cls=mean[0], loss_sal=mean[1], loss=mean[2], lr=lr,
                           images_per_s=window_n * args.batch_size / dt,
                           sec_per_iter=dt / window_n, mem_mb=peak_memory_mb(device))
                metrics.log(**rec)
                bar.set_postfix(loss=f"{mean[2]:.4f}", lr=f"{lr:.2e}")
                logger.info("iter %d/%d loss %.4f (cls %.4f sal %.4f) lr %.3e %.1f img/s "
                            "mem %.0f MB", done, args.max_iters, mean[2], mean[0], mean[1], lr,
                            rec["images_per_s"], rec["mem_mb"])
                window.zero_()
                window_n, t_window = 0, time.perf_counter()
            if done % args.ckpt_every == 0 or done == end_iter:
                save_checkpoint(run_dir / LAST_NAME, model, optimizer, scaler, done, args)
                last_good = run_dir / LAST_NAME

    if end_iter < args.max_iters:
        logger.info("stopped after --stop-after %d iterations at %d/%d; continue with --resume",
                    args.stop_after, end_iter, args.max_iters)
        return run_dir
    if start_iter >= args.max_iters:
        logger.info("the checkpoint is already at iteration %d (--max_iters %d)", start_iter,
                    args.max_iters)
    if world > 1:
        check_ranks_agree(unwrap(model))
    if du.is_main_process():
        # Plain state dict, no "module." prefix: published layout, read by infer.py and the
        # published tools. Written after checkpoint_last.pth, so its presence means "finished".
        torch_save(unwrap(model).state_dict(), run_dir / FINAL_NAME)
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        logger.info("finished: %s", run_dir / FINAL_NAME)
    du.barrier()
    return run_dir


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser("EPS / baseline classifier training",
                                     parents=[get_args_parser()], allow_abbrev=False)
    args = parser.parse_args(argv)
    try:
        main(args)
    except (TrainingError, RunDirError, DataError, MetadataError, WeightsError) as e:
        setup_logging()
        logger.error("%s", e)
        return 2
    finally:
        du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
