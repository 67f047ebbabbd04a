"""CAMs and pseudo-masks from a trained (or released) EPS / baseline classifier.

    python infer.py --dataset voc12 --infer_list metadata/voc12/train.txt \
        --img_root $VOC/JPEGImages --weights checkpoint_cls.pth --thr 0.20 \
        --cam-dir out/cam --png-dir out/png --vis-dir out/vis

Defaults reproduce the published infer.py (reference.md 1.10): scales 0.5/1/1.5/2 plus the
horizontal flip of each, bicubic resizing with Python round() sizes, cls = ReLU CAMs upsampled
then summed, eps = softmax over the C+1 maps at feature resolution then upsampled (background map
dropped), CAMs masked by the image labels, per-class max normalisation (+1e-5), pseudo-mask =
argmax([0.20; cams]). The published command line is accepted unchanged.

Outputs (all optional, written atomically, one file per image):
  --cam-dir (--cam_npy)  <id>.npz: keys int64 (K,), cams float32 (K,H,W) [, bg float32 (H,W)]
  --png-dir (--cam_png)  <id>.png: palette PNG, values 0..C (0 = background)
  --crf                  <id>.png: CRF-refined pseudo-mask (psa or DeepLab parameters)
  --vis-dir              <id>.png for the first --vis-num ids of the list: image, mask, CAMs
A rerun skips ids whose requested outputs all exist (resume); --overwrite recomputes them.
Under torchrun every rank takes ids[rank::world] and writes into the same folders.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from data.datasets import DataError, InferDataset
from data.metadata import MetadataError
from data.registry import DATASETS, DatasetInfo, get_dataset
from data.transforms import INFER_SCALES
from network import build_network, normalize_network_name
from network.fuse import FusedNetwork, fuse_for_inference
from network.weights import (WeightsError, describe_checkpoint, load_state_dict_file, load_weights,
                             small_net_kwargs)
from utils import cam as camlib
from utils.crf import CRF_PRESETS, cam_crf, crf_mask
from utils.dist import barrier, cleanup, get_rank, get_world_size, init_distributed, is_main_process
from utils.io import save_label_png, save_npz
from utils.run import setup_logging, write_run_info
from utils.vis import save_cam_overview

logger = logging.getLogger(__name__)


class InferError(ValueError):
    """A bad flag combination or a checkpoint that does not fit; the message says the fix."""


# Flags whose value changes what is written: a resumed run must use the same ones
# (--fast / --fuse / --winograd / --channels-last / --num-workers only change the speed).
RESULT_FLAGS = ("dataset", "weights", "network", "thr", "scales", "bg_from_eps", "save_bg",
                "crf_alpha", "crf_t", "crf_params", "amp")


def get_args_parser():
    p = argparse.ArgumentParser("EPS CAM / pseudo-mask inference", add_help=False)
    g = p.add_argument_group("published infer.py flags")
    g.add_argument("--dataset", type=str, default="voc12", choices=sorted(DATASETS),
                   help="dataset (voc12: 20 classes, coco: 80; custom: VOC layout with your metadata)")
    g.add_argument("--infer_list", "--infer-list", type=str, default=None,
                   help="id list file or split name (default: the dataset's published list, "
                        "voc12/coco 'train', as in the published scripts)")
    g.add_argument("--img_root", "--img-root", "--data_root", "--data-root", dest="img_root",
                   type=Path, required=True,
                   help="dataset root or its image folder (VOC: .../JPEGImages as published)")
    g.add_argument("--network", type=str, default=None,
                   help="network name, e.g. network.resnet38_eps or resnet38_cls (default: "
                        "inferred from the checkpoint)")
    g.add_argument("--weights", type=Path, required=True,
                   help="trained weights (.pth), e.g. the released checkpoint_cls.pth")
    g.add_argument("--thr", type=float, default=camlib.DEFAULT_THR,
                   help="constant background score of the pseudo-masks (paper: 0.20)")
    g.add_argument("--cam-dir", "--cam_npy", dest="cam_dir", type=Path, default=None,
                   help="write <id>.npz CAMs here (keys, cams[, bg]; published: pickled .npy dicts)")
    g.add_argument("--png-dir", "--cam_png", dest="png_dir", type=Path, default=None,
                   help="write <id>.png pseudo-masks here (palette PNG, 0..C)")
    g.add_argument("--crf", type=Path, default=None,
                   help="write CRF-refined pseudo-masks here (not used for the published numbers)")
    g.add_argument("--crf_alpha", "--crf-alpha", type=float, nargs="+", default=[4],
                   help="CRF background exponent(s): bg = (1 - max cam)^alpha (psa: 4 and 32)")
    g.add_argument("--crf_t", "--crf-t", type=int, nargs="+", default=[10],
                   help="CRF mean-field iterations (psa/DeepLab: 10)")
    g.add_argument("--n_gpus", type=int, default=None,
                   help="accepted for compatibility and ignored: launch with torchrun instead")
    g.add_argument("--n_processes_per_gpu", type=int, nargs="*", default=None,
                   help="accepted for compatibility and ignored: launch with torchrun instead")

    g = p.add_argument_group("outputs and resume")
    g.add_argument("--vis-dir", type=Path, default=None,
                   help="write overlays (image, pseudo-mask, per-class CAMs) here")
    g.add_argument("--vis-num", type=int, default=20,
                   help="overlays for the first N ids of the list (default 20)")
    g.add_argument("--crf-params", type=str, default="psa", choices=sorted(CRF_PRESETS),
                   help="CRF pairwise parameters: psa (3/3, 80/13/10; EPS infer.py) or deeplab "
                        "(4/67/3/3/1; EPS paper comparison)")
    g.add_argument("--bg-from-eps", action=argparse.BooleanOptionalAction, default=False,
                   help="deviation: background score = mean EPS background probability over the "
                        "views instead of the constant --thr (eps heads only; paper: off)")
    g.add_argument("--save-bg", action=argparse.BooleanOptionalAction, default=False,
                   help="also store the EPS background map in the npz (on with --bg-from-eps)")
    g.add_argument("--overwrite", action="store_true",
                   help="recompute ids whose outputs already exist (default: skip them = resume)")
    g.add_argument("--run-dir", type=Path, default=None,
                   help="where args.json / env.json / log.txt go (default: the first output folder)")

    g = p.add_argument_group("data, speed and devices")
    g.add_argument("--metadata-dir", type=Path, default=None,
                   help="folder with labels.txt / image_labels.txt (default: metadata/<dataset>)")
    g.add_argument("--scales", type=float, nargs="+", default=list(INFER_SCALES),
                   help="inference scales (paper: 0.5 1.0 1.5 2.0), each also flipped")
    g.add_argument("--skip-missing", action="store_true",
                   help="drop listed ids whose image file is missing (default: stop with an error)")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="batched flip pairs + feature-resolution sums (same numbers, faster); "
                        "--no-fast runs the published one-view-at-a-time loop")
    g.add_argument("--batch-views", type=str, default="auto", choices=["auto", "on", "off"],
                   help="fast path: run an image and its flip as one batch (auto: on for CUDA, "
                        "off for the CPU, where it measured slower)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format in the fast path (faster convolutions)")
    g.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path on the CPU: an inference-only copy of the network with its "
                        "conv-BN pairs folded (network/fuse.py), run as the Winograd graph "
                        "(--winograd) or as a frozen TorchScript graph with pre-packed oneDNN "
                        "weights (--no-winograd; 1.25x less CPU time per VOC image than "
                        "--no-fast on 2 threads); CAMs equal within ~2e-6")
    g.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=True,
                   help="with --fuse on the CPU: 3x3 convs with >= 256 input channels as Winograd "
                        "F(2x2,3x3) (2.25x fewer multiply-adds, network/winograd.py), the other "
                        "convs with pre-packed oneDNN weights; same function, CAMs within ~2e-6, "
                        "1.5-1.7x less CPU time per VOC image than --no-fast on 2 threads, about "
                        "0.8 GB more memory at scale 2 (--no-winograd: direct convolutions)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="float16 autocast on CUDA (changes CAMs slightly; ignored on CPU)")
    g.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader workers that decode and resize images")
    g.add_argument("--writer-threads", type=int, default=2,
                   help="threads (processes with --crf) that compress and write outputs and run "
                        "the CRF while the network works on the next image")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when available")
    return p


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def resolve_network(sd, weights: Path, network: Optional[str], num_classes: int,
                    dataset: str) -> Tuple[str, dict]:
    """Network name from --network or from the checkpoint's shapes; checks the class count
    against the dataset (a VOC checkpoint on COCO must fail here, not produce garbage)."""
    desc = describe_checkpoint(sd, num_classes)
    outputs = desc["fc8_outputs"]
    if outputs is None:
        raise InferError(f"{weights}: {desc['summary']}; infer.py needs a trained classifier "
                         f"(e.g. the released checkpoint_cls.pth or train.py's output)")
    if desc["num_classes"] != num_classes:
        what = (f"a {desc['head_type']} checkpoint for {desc['num_classes']} classes"
                if desc["num_classes"] else f"fc8 with {outputs} outputs")
        raise InferError(
            f"{weights}: {what}, but dataset {dataset!r} has {num_classes} classes (a cls "
            f"checkpoint needs {num_classes} fc8 outputs, an eps one {num_classes + 1}); pass the "
            f"matching --dataset (voc12: 20, coco: 80) or the checkpoint trained on this dataset")
    if network:
        name = normalize_network_name(network)
        if desc["network"] and name != desc["network"]:
            raise InferError(f"{weights}: --network {network} does not match the checkpoint "
                             f"({desc['summary']}); drop --network to infer it")
    elif desc["network"]:
        name = desc["network"]
    else:
        raise InferError(f"{weights}: cannot tell the network from the checkpoint "
                         f"({desc['summary']}); pass --network")
    return name, desc


def build_model(weights: Path, network: Optional[str], info: DatasetInfo,
                device: torch.device) -> torch.nn.Module:
    """Build the network the checkpoint holds and load it strictly (published: strict load)."""
    sd = load_state_dict_file(weights)
    name, desc = resolve_network(sd, weights, network, info.num_classes, info.name)
    kwargs = small_net_kwargs(sd) if name.startswith("small") else {}
    model = build_network(name, info.num_classes, **kwargs)
    load_weights(model, sd)
    logger.info("network %s from %s: %s", name, weights, desc["summary"])
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# CAMs of one image: the published loop and the fast path
# --------------------------------------------------------------------------------------------
def cams_reference(model, images: Sequence[torch.Tensor], label: torch.Tensor,
                   size: Tuple[int, int], device: torch.device):
    """The published computation: 8 forward passes of batch 1, each view upsampled on its own.
    Returns (keys, cams (K,H,W), bg (H,W) or None) on ``device``."""
    head = model.head_type
    label = label.to(device)

    def views():
        for img in images:
            x = img.to(device)[None]
            for flipped in (False, True):
                raw = model.forward_cam(x.flip(-1) if flipped else x)
                yield raw[0].float(), flipped

    sum_fg, sum_bg, n = camlib.combine_views_reference(views(), size, label, head)
    return camlib.finalize(sum_fg, sum_bg, n, label)


def batch_views_default(choice: str, device: torch.device) -> bool:
    """--batch-views auto: batch on CUDA (fuller GPU), one view at a time on the CPU, where a
    batch of two large views measured 4-6% slower (twice the activations, worse cache use)."""
    return device.type == "cuda" if choice == "auto" else choice == "on"


def cams_fast(model, images: Sequence[torch.Tensor], label: torch.Tensor, size: Tuple[int, int],
              device: torch.device, channels_last: bool = True, amp: bool = False,
              batch_views: bool = True):
    """Same numbers as :func:`cams_reference`, less work: each flip pair is summed at feature
    resolution and only the present classes are upsampled (utils/cam.py); with ``batch_views``
    a scale's image and its flip go through the network as one batch (scales of equal size
    share it)."""
    head = model.head_type
    label = label.to(device)
    keys = camlib.present_classes(label)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for img in images:
        groups.setdefault(tuple(img.shape), []).append(img)
    sum_fg, sum_bg = None, None
    for imgs in groups.values():
        x = torch.stack([i.to(device, non_blocking=True) for i in imgs])
        # [img0, flip(img0), img1, flip(img1), ...]
        batch = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        with autocast:
            if batch_views:
                raw = model.forward_cam(batch.contiguous(memory_format=fmt))
            else:
                raw = torch.cat([model.forward_cam(v[None].contiguous(memory_format=fmt)) for v in batch])
        for pair in raw.unflatten(0, (len(imgs), 2)):
            fg, bg = camlib.combine_flip_pair(pair, size, keys, label, head)
            sum_fg = fg if sum_fg is None else sum_fg + fg
            if bg is not None:
                sum_bg = bg if sum_bg is None else sum_bg + bg
    return camlib.finalize(sum_fg, sum_bg, 2 * len(images), label, keys=keys)


def uses_fused(fast: bool, fuse: bool, device: torch.device) -> bool:
    """The fused network (network/fuse.py) is a CPU-only part of the fast path."""
    return fast and fuse and device.type == "cpu"


def prepare_model(model, fast: bool, channels_last: bool, fuse: bool = False,
                  winograd: bool = False):
    """channels_last weights only for the fast path; the reference loop keeps the default layout.
    With ``fuse`` (CPU fast path) an inference-only fused copy (network/fuse.py): with
    ``winograd`` the eager Winograd / pre-packed graph, else the frozen TorchScript one. Each
    takes any input layout."""
    if fast and fuse:
        for wino in ([True, False] if winograd else [False]):
            try:
                return fuse_for_inference(model.eval(), winograd=wino)
            except Exception as e:  # a speed-only feature: fall back to the next one, loudly
                logger.warning("could not build the %s network (%s: %s); falling back to %s "
                               "(pass %s to skip this attempt)",
                               "Winograd" if wino else "fused", type(e).__name__, e,
                               "the frozen graph" if wino else "the eager fast path",
                               "--no-winograd" if wino else "--no-fuse")
    fmt = torch.channels_last if (fast and channels_last) else torch.contiguous_format
    return model.to(memory_format=fmt)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def crf_dirs(crf_root: Optional[Path], alphas: Sequence[float],
             ts: Sequence[int]) -> Dict[Tuple[float, int], Path]:
    """One folder per (alpha, t): the --crf folder itself for one pair, sub-folders a<alpha>_t<t>
    when several are given (psa ran alpha 4 and 32 side by side)."""
    if crf_root is None:
        return {}
    pairs = [(float(a), int(t)) for a in alphas for t in ts]
    if len(pairs) == 1:
        return {pairs[0]: crf_root}
    return {(a, t): crf_root / f"a{a:g}_t{t}" for a, t in pairs}


class Outputs:
    """Paths of every output of one id, the completeness check used for resume, and the writers."""

    def __init__(self, args, class_names: Sequence[str], vis_ids: set):
        self.cam_dir, self.png_dir, self.vis_dir = args.cam_dir, args.png_dir, args.vis_dir
        self.crf = crf_dirs(args.crf, args.crf_alpha, args.crf_t)
        self.crf_params = args.crf_params
        self.thr, self.bg_from_eps = args.thr, args.bg_from_eps
        self.save_bg = args.save_bg or args.bg_from_eps
        self.class_names = list(class_names)
        self.vis_ids = vis_ids

    @property
    def needs_image(self) -> bool:
        return bool(self.crf) or (self.vis_dir is not None and bool(self.vis_ids))

    def folders(self) -> List[Path]:
        return [d for d in (self.png_dir, self.cam_dir, *self.crf.values(), self.vis_dir) if d is not None]

    def paths(self, img_id: str) -> List[Path]:
        out = []
        if self.cam_dir is not None:
            out.append(self.cam_dir / f"{img_id}.npz")
        if self.png_dir is not None:
            out.append(self.png_dir / f"{img_id}.png")
        out += [d / f"{img_id}.png" for d in self.crf.values()]
        if self.vis_dir is not None and img_id in self.vis_ids:
            out.append(self.vis_dir / f"{img_id}.png")
        return out

    def any_output(self) -> bool:
        """Whether any output folder already holds a result file (of any id)."""
        for d in self.folders():
            if d.is_dir():
                with os.scandir(d) as it:
                    if any(e.name.endswith((".png", ".npz")) and not e.name.startswith(".") for e in it):
                        return True
        return False

    def complete(self, img_id: str) -> bool:
        # Every writer is atomic (temporary file + rename), so an existing file is a whole file.
        return all(p.is_file() for p in self.paths(img_id))

    def write(self, img_id: str, keys: np.ndarray, cams: np.ndarray, bg: Optional[np.ndarray],
              mask: np.ndarray, image: Optional[np.ndarray]) -> None:
        """Write all outputs of one image (runs in a writer thread)."""
        if self.cam_dir is not None:
            arrays = dict(keys=keys.astype(np.int64), cams=cams.astype(np.float32))
            if bg is not None and self.save_bg:
                arrays["bg"] = bg.astype(np.float32)
            save_npz(self.cam_dir / f"{img_id}.npz", **arrays)
        if self.png_dir is not None:
            save_label_png(self.png_dir / f"{img_id}.png", mask)
        for (alpha, t), folder in self.crf.items():
            probs = cam_crf(image, cams, alpha=alpha, n_iters=t, preset=self.crf_params)
            save_label_png(folder / f"{img_id}.png", crf_mask(probs, keys))
        if self.vis_dir is not None and img_id in self.vis_ids:
            save_cam_overview(self.vis_dir / f"{img_id}.png", image, mask, keys.tolist(), cams,
                              self.class_names, bg=bg, title=img_id)


def check_settings(run_dir: Path, args, has_outputs: bool) -> None:
    """Refuse to resume into folders made with different result-affecting flags."""
    prev_path = run_dir / "args.json"
    if args.overwrite or not has_outputs or not prev_path.is_file():
        return
    try:
        prev = json.loads(prev_path.read_text())
    except (OSError, ValueError):
        return
    cur = json.loads(json.dumps(vars(args), default=str))
    diff = {k: (prev.get(k), cur.get(k)) for k in RESULT_FLAGS if k in prev and prev.get(k) != cur.get(k)}
    if diff:
        text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise InferError(f"the output folders already hold results made with other settings "
                         f"({text}; see {prev_path}). Rerun with the same flags to resume, pass "
                         f"--overwrite to recompute every image, or choose new output folders.")


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def _identity(item):
    return item


def writer_pool(workers: int, processes: bool):
    """Executor for Outputs.write. Threads overlap compression and disk writes with the network
    (zlib and PNG encoding release the GIL); pydensecrf holds the GIL for about a second per
    image, so with --crf the writers are separate processes (spawned: safe next to CUDA)."""
    workers = max(1, workers)
    if processes:
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    return ThreadPoolExecutor(max_workers=workers)


def make_cams(model, dataset: InferDataset, outputs: Outputs, device: torch.device, *,
              thr: float, bg_from_eps: bool, fast: bool = True, channels_last: bool = True,
              amp: bool = False, batch_views: bool = True, num_workers: int = 2,
              writer_threads: int = 2, progress: bool = True, fuse: bool = True,
              winograd: bool = True) -> int:
    """Run the model over ``dataset`` and write every output; returns the number of images."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", collate_fn=_identity)
    model = prepare_model(model, fast, channels_last, fuse=uses_fused(fast, fuse, device),
                          winograd=winograd)
    if isinstance(model, FusedNetwork):
        logger.info("fused network for the CPU fast path: %s", model.description)
        channels_last = False
    pending: List[Future] = []
    n = 0
    with writer_pool(writer_threads, processes=bool(outputs.crf)) as pool, torch.inference_mode():
        for item in tqdm(loader, desc="cams", disable=not progress, dynamic_ncols=True):
            size = tuple(int(s) for s in item["size"])
            if fast:
                keys, cams, bg = cams_fast(model, item["images"], item["label"], size, device,
                                           channels_last=channels_last, amp=amp,
                                           batch_views=batch_views)
            else:
                keys, cams, bg = cams_reference(model, item["images"], item["label"], size, device)
            mask = camlib.pseudo_mask(keys, cams, thr=thr, bg=bg if bg_from_eps else None)
            result = (item["id"], keys.cpu().numpy(), cams.cpu().numpy(),
                    None if bg is None else bg.cpu().numpy(), mask.cpu().numpy(), item.get("image"))
            pending.append(pool.submit(outputs.write, *result))
            # Bounded queue: re-raise writer errors early and cap the memory held by results.
            while len(pending) > 2 * max(1, writer_threads) or (pending and pending[0].done()):
                pending.pop(0).result()
            n += 1
        for f in pending:
            f.result()
    return n


def main(args):
    device = init_distributed(args.device)
    rank, world = get_rank(), get_world_size()
    outputs_given = [d for d in (args.png_dir, args.cam_dir, args.crf, args.vis_dir) if d is not None]
    if not outputs_given:
        raise InferError("nothing to write: pass at least one of --png-dir (--cam_png), "
                         "--cam-dir (--cam_npy), --crf or --vis-dir")
    run_dir = args.run_dir or outputs_given[0]
    setup_logging(run_dir / "log.txt")
    if args.n_gpus is not None or args.n_processes_per_gpu is not None:
        logger.info("--n_gpus / --n_processes_per_gpu are ignored: for several GPUs or processes "
                    "launch with torchrun --nproc_per_node N infer.py ...")
    if args.amp and device.type != "cuda":
        logger.info("--amp is ignored on the CPU (float32 keeps the published numbers)")
        args.amp = False

    args.weights = args.weights.resolve()  # args.json records where the weights came from
    info = get_dataset(args.dataset, args.metadata_dir, args.img_root)
    try:
        _ = info.image_labels
    except MetadataError as e:
        raise InferError(f"{e}: CAMs are masked by the image labels; create "
                         f"image_labels.txt (tools/make_cls_labels.py) or pass --metadata-dir") from None
    model = build_model(args.weights, args.network, info, device)
    if args.bg_from_eps and model.head_type != "eps":
        raise InferError("--bg-from-eps needs an eps checkpoint (the cls head has no background map)")

    ids = info.read_ids(args.infer_list or info.train_defaults.get("infer_list", "train"))
    vis_ids = set(ids[:max(0, args.vis_num)]) if args.vis_dir is not None else set()
    outputs = Outputs(args, info.class_names, vis_ids)
    mine = ids[rank::world]  # interleaved split: every rank gets a similar mix of image sizes
    todo = mine if args.overwrite else [i for i in mine if not outputs.complete(i)]
    # Decided from the folders, not from this rank's ids, so every rank takes the same branch.
    check_settings(run_dir, args, has_outputs=outputs.any_output())
    barrier()
    write_run_info(run_dir, args)
    logger.info("%d ids in the list; rank %d/%d has %d, %d already complete%s", len(ids), rank,
                world, len(mine), len(mine) - len(todo),
                "" if args.overwrite else " (skipped; --overwrite recomputes them)")
    if todo:
        dataset = InferDataset(info, args.img_root, todo, scales=args.scales,
                               skip_missing=args.skip_missing, return_image=outputs.needs_image)
        logger.info("%s", dataset)
        t0 = time.time()
        n = make_cams(model, dataset, outputs, device, thr=args.thr, bg_from_eps=args.bg_from_eps,
                      fast=args.fast, channels_last=args.channels_last, amp=args.amp,
                      batch_views=batch_views_default(args.batch_views, device),
                      num_workers=args.num_workers, writer_threads=args.writer_threads,
                      progress=is_main_process(), fuse=args.fuse, winograd=args.winograd)
        dt = time.time() - t0
        logger.info("rank %d: %d images in %.1f s (%.3f s/image)", rank, n, dt, dt / max(n, 1))
    barrier()
    if is_main_process():
        logger.info("outputs: %s", ", ".join(str(d) for d in outputs.folders()))


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser("EPS CAM / pseudo-mask inference", parents=[get_args_parser()],
                                     allow_abbrev=False)
    args = parser.parse_args(argv)
    try:
        main(args)
    except (InferError, DataError, MetadataError, WeightsError, FileNotFoundError) as e:
        setup_logging()
        logger.error("%s", e)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
