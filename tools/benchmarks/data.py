"""Benchmark section "data": can the DataLoader workers feed the GPU?

Images per second that one DataLoader worker supplies, for the real pipelines on a generated
VOC-like dataset (500x375 and 375x500 JPEGs with 8-bit saliency PNGs, written to a temporary
folder):
* training: ``data.datasets.ClsSalDataset`` with its ``ClsSalTrainTransform`` at the VOC recipe
  (crop 448, long side 256-512, colour jitter, flip), through train.py's seeded loader
  (utils/sampler.py: per-sample seeding, batches of 8, default collate);
* inference: ``data.datasets.InferDataset`` (4 scales, bicubic, normalised float32), one image
  per item as infer.py loads it.

"1 worker" is measured in this process with one torch thread, which is what a DataLoader worker
runs with (torch sets 1 thread in workers); the first batch / items are warm-up. The files were
just written, so they come from the page cache: a cold disk or a network file system can be
slower. The real loader with W = min(8, cores, what /dev/shm has room for) worker processes is
measured too (batches after the first, so worker start-up is excluded): its ratio to W x the
1-worker rate shows how well workers scale on this machine (inter-process copies, collation,
free cores).

Headroom = (workers x 1-worker rate) / what the GPU consumes, at each entry point's default
worker count (train.py --num_workers 8, infer.py --num-workers 2). The GPU's rate comes from
the rows of the "train" and "infer" sections when they ran before this one on CUDA (ResNet-38
EPS, batch 8, crop 448; the default inference path at 500x375), or from --gpu-images-per-s.
Target: at least 2x, so that augmentation never stalls the GPU. The workers x rate supply
assumes that many free cores per GPU process (K GPUs with 8 workers each need 8K cores).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from data.datasets import ClsSalDataset, InferDataset
from data.metadata import write_class_names, write_id_list, write_image_labels
from data.registry import get_dataset
from data.transforms import INFER_SCALES
from utils.sampler import seeded_loader

VOC_CROP, VOC_RESIZE, VOC_BATCH = 448, (256, 512), 8      # the VOC recipe (docs/training.md)
TRAIN_WORKERS, INFER_WORKERS = 8, 2                       # train.py / infer.py defaults
TARGET_HEADROOM = 2.0
NUM_CLASSES = 20


# ------------------------------------------------------------------------------------------------
# a VOC-like dataset
# ------------------------------------------------------------------------------------------------
def make_dataset(root: Path, n: int, seed: int = 0) -> List[str]:
    """n images in the 'custom' (VOC) layout: smooth textured JPEGs (quality 90, like VOC's),
    every fourth one portrait, with 1-2 elliptic objects that are also the saliency map."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SALImages").mkdir()
    labels: Dict[str, np.ndarray] = {}
    for i in range(n):
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        small = rng.integers(0, 256, (h // 12, w // 12, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)  # texture: JPEG cost like a photo
        yy, xx = np.mgrid[:h, :w]
        sal = np.zeros((h, w), np.uint8)
        vec = np.zeros(NUM_CLASSES, np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[inside] = rng.integers(0, 256, 3)
            sal[inside] = 255
            vec[int(rng.integers(0, NUM_CLASSES))] = 1
        img_id = f"img_{i:05d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{img_id}.jpg", quality=90)
        Image.fromarray(sal, mode="L").save(root / "SALImages" / f"{img_id}.png")
        labels[img_id] = vec
    write_class_names(root / "labels.txt", ["background"] + [f"class{c}" for c in range(NUM_CLASSES)])
    write_image_labels(root / "image_labels.txt", labels)
    write_id_list(root / "train.txt", labels)
    return list(labels)


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
class _one_thread:
    """torch with one thread, as in a DataLoader worker (torch/utils/data/_utils/worker.py)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _rate(batches, n_warmup: int, n_timed: int, images_of) -> float:
    """images/s over ``n_timed`` items of an iterator after ``n_warmup`` untimed ones."""
    it = iter(batches)
    for _ in range(n_warmup):
        next(it)
    t, images = time.perf_counter(), 0
    for _ in range(n_timed):
        images += images_of(next(it))
    return images / (time.perf_counter() - t)


def train_rates(info, root: Path, n_batches: int, workers: int, pin: bool):
    dataset = ClsSalDataset(info, root, root / "SALImages", "train", crop_size=VOC_CROP,
                            resize_size=VOC_RESIZE)

    def loader(num_workers):
        return seeded_loader(dataset, global_batch=VOC_BATCH, seed=0, start_batch=0, rank=0,
                             world_size=1, num_workers=num_workers, pin_memory=pin)
    with _one_thread():
        one = _rate(loader(0), 1, n_batches, lambda b: len(b[0]))
    many = _rate(loader(workers), 1, n_batches * workers, lambda b: len(b[0]))
    return dataset, one, many


def _identity(item):
    return item


class _Cycle:
    """Indices 0..n-1 over and over: a loader that never ends, so its workers start only once."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        while True:
            yield from range(self.n)


def infer_rates(info, root: Path, ids, n_items: int, workers: int, pin: bool):
    dataset = InferDataset(info, root, ids, scales=INFER_SCALES)
    with _one_thread():
        one = _rate((dataset[i % len(dataset)] for i in range(10 ** 9)), 2, n_items, lambda _: 1)

    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Cycle(len(dataset)),
                                         num_workers=workers, pin_memory=pin,
                                         collate_fn=_identity)
    many = _rate(loader, workers, n_items * workers, lambda _: 1)
    return dataset, one, many


def shm_workers(path: str = "/dev/shm") -> int:
    """How many workers /dev/shm has room for (workers hand batches over through it; a
    container's default 64 MB is a bus error with several, utils/device.check_shared_memory)."""
    from utils.device import SHM_PER_WORKER_MB
    if not os.path.isdir(path):
        return TRAIN_WORKERS
    return int(shutil.disk_usage(path).free / 2 ** 20 // SHM_PER_WORKER_MB)


# ------------------------------------------------------------------------------------------------
# what the GPU consumes
# ------------------------------------------------------------------------------------------------
def train_consumers(args) -> List[Dict]:
    """GPU training rates (images/s) from the train section's CUDA rows at the VOC recipe, or
    --gpu-images-per-s: the default fp32 row and the fastest row."""
    given = getattr(args, "gpu_images_per_s", None)
    if given:
        return [{"consumer": "--gpu-images-per-s", "rate": float(given)}]
    rows = [r for r in getattr(args, "results", {}).get("train", [])
            if r.get("device") == "cuda" and r.get("crop") == VOC_CROP and r.get("batch") == VOC_BATCH
            and r.get("images_per_s")]
    out = []
    default = [r for r in rows if r.get("variant") == "default"]
    if default:
        out.append({"consumer": f"train step, {default[0]['flags']}", "rate": default[0]["images_per_s"]})
    if rows:
        best = max(rows, key=lambda r: r["images_per_s"])
        if not default or best is not default[0]:
            out.append({"consumer": f"train step, {best['flags']} (fastest)",
                        "rate": best["images_per_s"]})
    return out


def infer_consumer(args) -> Optional[Dict]:
    rows = [r for r in getattr(args, "results", {}).get("infer", [])
            if r.get("device") == "cuda" and r.get("variant") == "default"
            and r.get("image") == "500x375" and r.get("s/image")]
    if not rows:
        return None
    return {"consumer": "CAMs, infer.py default CUDA path", "rate": 1.0 / rows[0]["s/image"]}


def _headroom_rows(pipeline, one, workers, consumers) -> List[Dict]:
    rows = []
    for c in consumers:
        supply = workers * one
        factor = supply / c["rate"]
        rows.append({"pipeline": pipeline, "measure": f"headroom at {workers} workers",
                     "workers": workers, "images/s": supply, "GPU consumer": c["consumer"],
                     "GPU images/s": c["rate"], "headroom": factor,
                     "target": f">= {TARGET_HEADROOM:g}x: " + ("met" if factor >= TARGET_HEADROOM
                                                              else "NOT met")})
    return rows


def run(args):
    quick = getattr(args, "quick", False)
    n_images = 16 if quick else 64
    n_batches = 1 if quick else 4            # per worker, of 8 images
    n_items = 3 if quick else 12             # inference items per worker
    workers = max(1, min(TRAIN_WORKERS, os.cpu_count() or 1, shm_workers()))
    pin = torch.cuda.is_available() and getattr(args, "device", "cpu") != "cpu"  # as train.py on a GPU
    rows: List[Dict] = []
    train_name = f"train: ClsSalDataset, crop {VOC_CROP}, resize {VOC_RESIZE[0]}-{VOC_RESIZE[1]}"
    infer_name = f"infer: InferDataset, scales {list(INFER_SCALES)}"
    with tempfile.TemporaryDirectory(prefix="eps_bench_data_") as tmp:
        root = Path(tmp)
        ids = make_dataset(root, n_images)
        info = get_dataset("custom", root, root)
        _, t_one, t_many = train_rates(info, root, n_batches, workers, pin)
        _, i_one, i_many = infer_rates(info, root, ids, n_items, workers, pin)
    for name, one, many in ((train_name, t_one, t_many), (infer_name, i_one, i_many)):
        rows.append({"pipeline": name, "measure": "1 worker (in-process, 1 thread)", "workers": 1,
                     "images/s": one, "variant": name.split(":")[0] + "_worker"})
        rows.append({"pipeline": name, "measure": f"DataLoader, {workers} worker processes",
                     "workers": workers, "images/s": many,
                     "scaling": many / (workers * one)})
    consumers = train_consumers(args)
    rows += _headroom_rows(train_name, t_one, TRAIN_WORKERS, consumers)
    if not consumers:
        rows.append({"pipeline": train_name, "measure": "headroom: no GPU rate (run the train "
                     "section on CUDA first, or pass --gpu-images-per-s)"})
    ic = infer_consumer(args)
    rows += _headroom_rows(infer_name, i_one, INFER_WORKERS, [ic] if ic else [])
    # One column order for every row (the table's columns follow the first row's keys).
    cols = ["pipeline", "measure", "workers", "images/s", "scaling", "GPU consumer",
            "GPU images/s", "headroom", "target", "variant"]
    rows = [{c: r.get(c) for c in cols} for r in rows]
    return (f"Data loading: images/s per DataLoader worker ({os.cpu_count()} cores) and headroom "
            f"over the GPU", rows)
