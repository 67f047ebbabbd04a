"""The data order of both training stages: infinite, seeded, resumable and sharded.

The published loops (EPS module/train.py, deeplab-pytorch main.py) shuffle with the global RNG
and restart the DataLoader iterator when it runs out, so a run cannot be resumed exactly and two
runs never see the same batches. Here:

* :class:`InfiniteBatchSampler`: epoch e is a permutation seeded by (seed, e); global batch t is
  slice t mod (n // global_batch) of epoch t // (n // global_batch) (shuffle + drop_last, as
  published); rank r takes the r-th contiguous part of it. Its only state is the batch number, so
  a resume is exact, and the union over ranks is the batch one process would draw: the same run
  on 1, 2 or 8 GPUs (or resumed on another number) sees the same data. With ``accum`` passes per
  step (gradient accumulation, train.py --iter-size), batch t is cut into ``accum`` consecutive
  parts first, each split over the ranks: the union over passes and ranks is still batch t.
* :class:`SeededSamples`: each sample's random augmentation runs under a seed made of
  (seed, epoch, index), so a sample is the same in any worker process, after a resume and under
  any world size, and the training process's own RNG (dropout) is left alone.
"""
from __future__ import annotations

import random
from typing import Iterator, List

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import UserError
from utils.workers import loader_worker_init


class SamplerError(UserError):
    """The list cannot be split as asked; the message says what to change."""


class InfiniteBatchSampler(Sampler):
    """Yields this rank's share of global batch t = start, start + 1, ... forever, as lists of
    (index, epoch) pairs (the epoch seeds the sample's augmentation); with ``accum`` > 1, the
    ``accum`` passes of batch t one after the other (``accum`` yields per batch)."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, flag: str = "--batch_size", accum: int = 1):
        if global_batch % (world_size * accum):
            raise SamplerError(f"{flag} {global_batch} is not divisible by the {world_size} "
                               f"processes" + (f" x {accum} accumulated passes" if accum > 1 else ""))
        if num_samples < global_batch:
            raise SamplerError(f"the training list has {num_samples} usable images, fewer than "
                               f"one batch of {global_batch}; lower {flag}")
        self.n, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_batch, self.rank, self.accum = start_batch, rank, accum
        self.per_rank = global_batch // (world_size * accum)
        self.per_pass = global_batch // accum
        self.steps_per_epoch = num_samples // global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def batch(self, t: int, part: int = 0) -> List[tuple]:
        epoch, k = divmod(t, self.steps_per_epoch)
        lo = k * self.global_batch + part * self.per_pass + self.rank * self.per_rank
        return [(int(i), epoch) for i in self.permutation(epoch)[lo:lo + self.per_rank]]

    def epoch_of(self, t: int) -> int:
        return t // self.steps_per_epoch

    def __iter__(self) -> Iterator[List[tuple]]:
        t, epoch, perm = self.start_batch, None, None
        while True:
            e, k = divmod(t, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            for part in range(self.accum):
                lo = k * self.global_batch + part * self.per_pass + self.rank * self.per_rank
                yield [(int(i), epoch) for i in perm[lo:lo + self.per_rank]]
            t += 1


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random augmentation (Python ``random``, numpy and torch RNGs,
    as the published transforms use them) under a seed made of (seed, epoch, index), then
    restores the RNG states."""

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
                # the CPU generator only: torch.manual_seed would also reseed the GPU's, which
                # fork_rng(devices=[]) does not restore (dropout on the GPU, num_workers 0)
                torch.default_generator.manual_seed(int(s[2]))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def seeded_loader(dataset: Dataset, *, global_batch: int, seed: int, start_batch: int, rank: int,
                  world_size: int, num_workers: int, pin_memory: bool,
                  flag: str = "--batch_size", accum: int = 1) -> DataLoader:
    """An endless DataLoader over ``dataset`` with the order described above, starting at global
    batch ``start_batch`` (``accum`` loader batches per global batch)."""
    sampler = InfiniteBatchSampler(len(dataset), global_batch, seed, start_batch, rank,
                                   world_size, flag=flag, accum=accum)
    # The loader's own generator (worker base seeds) is separate from the global torch RNG, so
    # creating the iterator does not shift the dropout stream (needed for an exact resume).
    return DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=loader_worker_init() if num_workers > 0 else None)
