"""Second stage inference: DeepLab-v2 on full images -> label PNGs (+ dense CRF) -> mIoU.

    python infer_seg.py --data-root $VOC --weights $OUT/deeplab/checkpoint_final.pth \\
        --out-dir $OUT/deeplab/val --crf

As deeplab-pytorch's test: full-size image (no resize or padding), batch 1, MSC max logits ->
bilinear to the image size -> softmax -> argmax. ``--crf`` also writes the dense-CRF result
(DeepLab parameters: 10 iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat
4) to ``<out-dir>_crf``. Both folders are then scored with evaluate.py when ground truth exists.

Existing PNGs are kept (a killed run continues where it stopped); writes are atomic.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.datasets import DataError, check_files, load_rgb
from data.registry import DATASETS, check_data_root, dataset_root_of, get_dataset
from data.seg_transforms import MEAN_BGR, SegEvalTransform
from network.deeplab import MAX_SCALE, MIN_SCALE, MSC_SCALES, load_trained
from utils import dist, flags, provenance
from utils.cli import add_flag, parent_parser, run_cli
from utils.device import add_numerics_args, configure_numerics, pin_memory, resolve_device
from utils.io import atomic_write_text, remove_stale_temps, save_label_png
from utils.progress import Progress
from utils.run import check_writable, setup_logging, write_run_info
from utils.workers import loader_worker_init, process_pool
from utils.errors import UserError

logger = logging.getLogger("infer_seg")

CRF_IMAGES = ("rgb", "published")


class InferSegError(UserError):
    """A problem with the inputs; the message says what to change."""


def get_args_parser() -> argparse.ArgumentParser:
    p = parent_parser("DeepLab-v2 inference and evaluation")
    flags.add_dataset(p, DATASETS)
    flags.add_data_root(p, help="dataset root (VOC: the folder holding JPEGImages) or its "
                                "JPEGImages folder")
    flags.add_metadata_dir(p)
    add_flag(p, "--list", "--infer-list", "--infer_list", type=str, default="val",
             help="id list, a split name or a path (paper: val, 1,449 images; also "
                  "--infer-list, as infer.py)")
    p.add_argument("--weights", type=Path, required=True,
                   help="checkpoint_final.pth of train_seg.py (or its run directory)")
    add_flag(p, "--out-dir", type=Path, required=True,
                   help="folder for the label PNGs <id>.png (palette, 0 = background)")
    add_flag(p, "--msc-scales", type=float, nargs="+",
                   default=list(MSC_SCALES), help="extra input scales of MSC (paper: 0.5 0.75)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the flipped image and take the pixel-wise max of the logits "
                        "(not in the published test; default off)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=False,
                   help="also write dense-CRF labels (DeepLab parameters 4/67/3/3/1, 10 iterations)")
    add_flag(p, "--crf-dir", type=Path, default=None,
                   help="folder for the CRF PNGs (default: <out-dir>_crf)")
    add_flag(p, "--crf-image", type=str, default="rgb",
                   choices=CRF_IMAGES,
                   help="image given to the CRF: 'rgb' = the raw image (default, correct; as "
                        "deeplab-pytorch demo.py) or 'published' = deeplab-pytorch main.py's bug "
                        "(mean-subtracted BGR cast to uint8, negatives wrap around)")
    add_flag(p, "--crf-workers", type=int, default=0,
                   help="CRF worker processes (0 = in this process; ~1 s per VOC image each)")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="score the PNGs with evaluate.py when the list has ground truth")
    add_flag(p, "--gt-dir", type=Path, default=None,
             help="ground-truth folder for evaluation (default: found under --data-root)")
    flags.add_overwrite(p, "recompute every image, replacing the PNGs in --out-dir (default: keep "
                           "them and compute the missing ones; PNGs of other weights are refused)")
    flags.add_skip_missing(p, "image")
    flags.add_check_data(p, when="before any output folder is made")
    flags.add_num_workers(p, 2, "image-loading workers")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="autocast (fp16 on CUDA, bf16 on CPU); default off")
    flags.add_channels_last(p, False, "channels_last memory format (often faster on CPU); same "
                                      "results up to float rounding")
    flags.add_device(p)
    add_flag(p, "--wait-poll", type=float, default=5.0,
                   help="under torchrun, seconds between rank 0's checks that every rank's PNGs "
                        "are written, before it evaluates (no collective waits on slow ranks)")
    add_numerics_args(p, cudnn_benchmark=False, published="off (each image has its own size)")
    dist.add_dist_args(p)
    return p


# --------------------------------------------------------------------------------------------

def crf_input_image(rgb: np.ndarray, mode: str = "rgb", mean_bgr=MEAN_BGR) -> np.ndarray:
    """The uint8 (H,W,3) image handed to the CRF.

    'rgb': the raw image. 'published': what deeplab-pytorch main.py passes, the mean-subtracted
    BGR float image cast to uint8; the cast of negative floats is made explicit here
    (truncate, then wrap modulo 256, as numpy's float->uint8 cast does on x86)."""
    if mode == "rgb":
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    if mode == "published":
        sub = rgb[:, :, ::-1].astype(np.float32) - np.asarray(mean_bgr, np.float32)
        return np.ascontiguousarray((np.trunc(sub).astype(np.int64) % 256).astype(np.uint8))
    raise ValueError(f"unknown CRF image mode {mode!r}; choose one of {CRF_IMAGES}")


@torch.no_grad()
def predict_probs(model, image: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(1,3,H,W) input -> (1,K,H,W) softmax probabilities at the input size (eval mode)."""
    logits = model(image)
    if flip:
        logits = torch.maximum(logits, model(image.flip(-1)).flip(-1))
    logits = F.interpolate(logits.float(), size=image.shape[-2:], mode="bilinear",
                           align_corners=False)
    return F.softmax(logits, dim=1)


def to_labels(probs: torch.Tensor) -> np.ndarray:
    """(K,H,W) probabilities -> (H,W) uint8 labels on the host. The argmax runs where the
    probabilities are (the GPU): one byte per pixel crosses to the host instead of K floats
    (COCO: 81 x 480 x 640 x 4 bytes, about 100 MB per image). torch and numpy both return the
    first of tied maxima, so the labels equal numpy's argmax of the copied probabilities."""
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def crf_labels(rgb: np.ndarray, probs: np.ndarray, mode: str) -> np.ndarray:
    """DeepLab dense CRF on (K,H,W) probabilities -> uint8 labels."""
    from utils.crf import CRF_PRESETS, dense_crf
    q = dense_crf(crf_input_image(rgb, mode), probs, **CRF_PRESETS["deeplab"])
    return q.argmax(axis=0).astype(np.uint8)


def _crf_job(rgb, probs, mode, path) -> str:
    save_label_png(path, crf_labels(rgb, probs, mode))
    return str(path)


class ImageList(Dataset):
    """(id, normalised CHW float32, raw uint8 RGB) for full-image inference; no mask needed."""

    def __init__(self, info, data_root, ids, skip_missing=False):
        self.transform = SegEvalTransform()
        paths = [(i, info.image_path(data_root, i)) for i in ids]
        missing = [str(p) for _, p in paths if not p.is_file()]
        if missing and not skip_missing:
            raise DataError(f"{len(missing)} of {len(ids)} images not found (first: {missing[0]}); "
                            f"check --data_root or pass --skip-missing")
        self.items = [(i, p) for i, p in paths if p.is_file()]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        img_id, path = self.items[k]
        rgb = np.array(load_rgb(path))  # writable: the DataLoader turns it into a tensor
        chw, _ = self.transform(rgb, np.zeros(rgb.shape[:2], np.uint8))
        return img_id, torch.from_numpy(chw), rgb


def resolve_weights(path: Path) -> Path:
    if path.is_dir():
        path = path / "checkpoint_final.pth"
    if not path.is_file():
        raise InferSegError(f"{path}: weights not found; pass checkpoint_final.pth written by "
                            f"train_seg.py (or its run directory)")
    return path


def run_inference(model, dataset, out_dir: Path, crf_dir: Optional[Path], *, device, flip=False,
                  crf_image="rgb", crf_workers=0, amp=False, channels_last=False,
                  num_workers=0, overwrite=False) -> Dict:
    """Write <out_dir>/<id>.png (and CRF PNGs); ids whose outputs exist are skipped unless
    ``overwrite``."""
    todo = [k for k, (i, _) in enumerate(dataset.items)
            if overwrite or not (out_dir / f"{i}.png").is_file()
            or (crf_dir is not None and not (crf_dir / f"{i}.png").is_file())]
    if len(todo) < len(dataset):
        logger.info("%d of %d images already done in %s; skipping them",
                    len(dataset) - len(todo), len(dataset), out_dir)
    loader = DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=None,
                        num_workers=num_workers, collate_fn=None, pin_memory=pin_memory(device),
                        worker_init_fn=loader_worker_init() if num_workers > 0 else None
                        ) if todo else []
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    # Spawned CRF workers that die with this process (utils/workers.py): forking after CUDA /
    # NCCL initialisation can hang the children.
    pool = process_pool(crf_workers) if (crf_dir is not None and crf_workers > 0) else None
    pending: List[cf.Future] = []
    t_net, n = 0.0, 0
    bar = Progress(len(todo), "infer_seg", enabled=dist.launched_rank() == 0 and bool(todo),
                   unit="img")
    try:
        for img_id, chw, rgb in loader:
            bar.update(1)
            x = chw[None].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = time.time()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                probs = predict_probs(model, x, flip)[0]
            labels = to_labels(probs)
            if crf_dir is not None:  # only the CRF needs the probabilities on the host
                probs = probs.cpu().numpy()
            t_net += time.time() - t
            n += 1
            save_label_png(out_dir / f"{img_id}.png", labels)
            if crf_dir is not None:
                rgb = np.asarray(rgb)
                if pool is None:
                    _crf_job(rgb, probs, crf_image, crf_dir / f"{img_id}.png")
                else:
                    pending.append(pool.submit(_crf_job, rgb, probs, crf_image,
                                               crf_dir / f"{img_id}.png"))
                    if len(pending) >= 2 * crf_workers:  # bound the memory held by queued jobs
                        pending.pop(0).result()
        for f in pending:
            f.result()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if n:
        logger.info("network: %.3f s per image over %d images", t_net / n, n)
    return {"written": n, "sec_per_image": t_net / n if n else None}


def evaluate_dir(args, pred_dir: Path, list_path: Path) -> Optional[dict]:
    """Score pred_dir with evaluate.py; re-uses its result file when no PNG is newer."""
    import evaluate
    eval_json = pred_dir.resolve().parent / f"{pred_dir.resolve().name}_eval.json"
    if eval_json.is_file() and eval_json.stat().st_mtime_ns >= newest_png(pred_dir):
        logger.info("predictions unchanged; reusing %s", eval_json)
        record = json.loads(eval_json.read_text())
        print(f"mIoU {record['miou'] * 100:.2f} ({eval_json})")
        return record
    argv = ["--dataset", args.dataset, "--datalist", str(list_path), "--pred_dir", str(pred_dir),
            "--save_path", str(eval_json.with_suffix(".txt")), "--json", str(eval_json),
            "--overwrite"]
    if args.data_root is not None:
        argv += ["--data-root", str(args.data_root)]
    if args.metadata_dir is not None:
        argv += ["--metadata-dir", str(args.metadata_dir)]
    if args.gt_dir is not None:
        argv += ["--gt_dir", str(args.gt_dir)]
    if args.skip_missing:
        argv += ["--skip-missing"]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def skipped_note(pred_dir: Path) -> Path:
    """<pred>_eval.skipped.txt: why <pred>_eval.txt was not computed (one line; the pipeline's
    results table prints it in the empty cell)."""
    pred_dir = Path(pred_dir)
    return pred_dir.parent / f"{pred_dir.name}_eval.skipped.txt"


def newest_png(folder: Path) -> int:
    return max((p.stat().st_mtime_ns for p in Path(folder).glob("*.png")), default=0)


# Settings that change the PNGs: existing outputs are only re-used when these are unchanged.
OUTPUT_SETTINGS = ("weights", "msc_scales", "flip", "crf_image", "dataset")


def stale_predictions(args, folders, weights_made_earlier: bool = False) -> Optional[str]:
    """A problem line when a prediction folder holds PNGs of other weights than --weights now
    (train_seg.py --resume --extend wrote a new checkpoint_final.pth under the same name, or an
    earlier stage of the pipeline is about to); None with --overwrite."""
    if args.overwrite:
        return None
    for folder in folders:
        why = (Path(folder).is_dir() and any(Path(folder).glob("*.png"))
               and provenance.weights_changed(folder, args.weights, weights_made_earlier))
        if why:
            return (f"{folder} holds predictions {why}; pass --overwrite (SEGINFER_ARGS for the "
                    f"scripts) to recompute every image, or delete {folder}")
    return None


def record_predictions(args, folders) -> None:
    """<folder>/.infer_settings.json: the settings and the weights' identity (utils/provenance.py)
    of the PNGs in each folder, written before the first of them."""
    key = str(Path(args.weights).resolve())
    known = next((k for k in (provenance.recorded_input(f, key) for f in folders) if k), None)
    settings = {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items()
                if k in OUTPUT_SETTINGS}
    text = json.dumps(dict(settings, inputs={key: provenance.file_identity(key, known)}),
                      indent=2, sort_keys=True) + "\n"
    for folder in folders:
        atomic_write_text(Path(folder) / provenance.RECORD_NAME, text)


def check_same_setting(args_json: Path, args) -> None:
    """Refuse to mix PNGs of different settings in one --out-dir (resume needs the same ones)."""
    if not args_json.is_file():
        return
    old = json.loads(args_json.read_text())
    now = json.loads(json.dumps(vars(args), default=str))
    diff = {k: (old.get(k), now.get(k)) for k in OUTPUT_SETTINGS if old.get(k) != now.get(k)}
    if diff:
        raise InferSegError(f"{args.out_dir} holds predictions made with other settings "
                            f"(before -> now: {diff}); choose another --out-dir")


def main(args) -> Dict:
    """Predict the list, optionally CRF, then evaluate; returns {"miou": ..., "miou_crf": ...}."""
    # 1. every check before anything is written
    if args.crf_workers < 0 or args.num_workers < 0 or not args.wait_poll > 0:
        raise InferSegError("--crf-workers and --num-workers must be >= 0, --wait-poll > 0")
    bad = [v for v in args.msc_scales if not (math.isfinite(v) and MIN_SCALE <= v <= MAX_SCALE)]
    if bad:
        raise InferSegError(f"--msc-scales {' '.join(map(str, bad))}: each scale must be in "
                            f"[{MIN_SCALE}, {MAX_SCALE}] (paper: 0.5 0.75)")
    device = resolve_device(args.device, dist.get_local_rank())
    numerics = configure_numerics(device, tf32=args.tf32, cudnn_benchmark=args.cudnn_benchmark)
    # No process group: the ranks share nothing but the list and the folders (utils/dist.py)
    rank, world = dist.launched_rank(), dist.launched_world_size()
    out_dir = args.out_dir
    crf_dir = (args.crf_dir or out_dir.with_name(out_dir.name + "_crf")) if args.crf else None
    run_dir = out_dir.with_name(out_dir.name + "_run")  # args.json, env.json, log.txt
    args.weights = resolve_weights(args.weights).resolve()
    for folder in (out_dir, run_dir, crf_dir):
        if folder is not None:
            check_writable(folder, "--out-dir / --crf-dir")
    if args.overwrite and dist.spans_nodes():
        # rank 0 waits for the other nodes' PNGs by their presence: old ones would satisfy it
        raise InferSegError("--overwrite cannot be used across several nodes (rank 0 could not "
                            "tell the other nodes' new PNGs from the old ones): delete the output "
                            "folders and run without --overwrite")
    folders = [d for d in (out_dir, crf_dir) if d is not None]
    problem = stale_predictions(args, folders)
    if problem:
        raise InferSegError(problem)
    if not args.overwrite:
        check_same_setting(run_dir / "args.json", args)
    if args.crf:
        from utils.crf import _densecrf
        _densecrf()  # fail now, not after the network pass, when pydensecrf is missing
    check_data_root(args.data_root, "--data_root")
    data_root = dataset_root_of(args.data_root)
    info = get_dataset(args.dataset, args.metadata_dir, data_root)
    list_path = info.list_path(args.list)
    ids = info.read_ids(list_path)
    dataset = ImageList(info, args.data_root, ids[rank::world],
                        args.skip_missing)
    if args.check_data:
        check_files([i for i, _ in dataset.items], [p for _, p in dataset.items])
    weights = args.weights
    model = load_trained(weights, msc_scales=args.msc_scales)
    if model.n_classes != info.num_classes + 1:
        raise InferSegError(f"{weights} predicts {model.n_classes} classes but {info.name} has "
                            f"{info.num_classes + 1} (background included): wrong --dataset?")

    # 2. the network pass; ranks finish independently. Temporary files a killed run left go;
    #    other ranks may be writing here now, so only those older than utils.io.STALE_AFTER_S.
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, crf_dir, run_dir):
        if folder is not None:
            remove_stale_temps(folder)
    setup_logging(run_dir / "log.txt")
    write_run_info(run_dir, args, numerics=numerics)
    record_predictions(args, folders)
    model.eval().to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    logger.info("%s (%s) on %d images of %s -> %s%s", weights, model.arch, len(dataset),
                list_path, out_dir, f" and {crf_dir}" if crf_dir else "")
    stats = run_inference(model, dataset, out_dir, crf_dir, device=device, flip=args.flip,
                          crf_image=args.crf_image, crf_workers=args.crf_workers, amp=args.amp,
                          channels_last=args.channels_last, num_workers=args.num_workers,
                          overwrite=args.overwrite)
    result = dict(stats, miou=None, miou_crf=None)
    if rank != 0:
        return result
    # 3. rank 0 scores every rank's PNGs once they are all written, or says why it cannot
    folders = [d for d in (out_dir, crf_dir) if d is not None]
    missing_gt = [] if args.gt_dir is not None else [
        info.gt_path(data_root, i) for i in ids[:20] if not info.gt_path(data_root, i).is_file()]
    why = ("not scored: --no-evaluate" if not args.evaluate else
           f"no score: the ground truth of {list_path.name} is missing (e.g. {missing_gt[0]}); "
           f"pass --gt_dir" if missing_gt else None)
    for folder in folders:
        note = skipped_note(folder)
        if why is None and note.exists():
            note.unlink()
    if why is not None:
        for folder in folders:  # the pipeline's results table shows it in the empty cell
            atomic_write_text(skipped_note(folder), why + "\n")
        print(f"infer_seg: predictions in {', '.join(map(str, folders))}; {why}", flush=True)
        result["why"] = why
        return result
    present = [i for i, _ in ImageList(info, args.data_root, ids, skip_missing=True).items]
    if world > 1:
        dist.wait_for_outputs(present, lambda i: all((f / f"{i}.png").is_file() for f in folders),
                              what="prediction PNGs", timeout_s=args.dist_timeout,
                              poll_s=args.wait_poll)
    # The published number (data/registry.py) printed beside ours.
    published = info.spec.published_miou.get("deeplab_eps")
    anchor = (f"published, EPS masks, DeepLab-v2 R101 (COCO init): {published} val mIoU"
              if published is not None else "")
    for key, folder in (("miou", out_dir), ("miou_crf", crf_dir)):
        if folder is None:
            continue
        record = evaluate_dir(args, folder, list_path)
        result[key] = record["miou"]
        tag = "with CRF" if key == "miou_crf" else "without CRF"
        # deeplab-pytorch's scores() (libs/utils/metric.py) averages only over classes present in the GT
        gt_only = record.get("miou_gt_classes")
        extra = (f" (GT-present classes only, deeplab-pytorch convention: {gt_only * 100:.2f})"
                 if gt_only is not None and abs(gt_only - record["miou"]) > 1e-9 else "")
        print(f"DeepLab-v2 {tag}: mIoU {record['miou'] * 100:.2f}{extra} on {list_path.name}"
              + (f"   [{anchor}]" if anchor else ""))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(get_args_parser, main, __doc__))
