"""utils/sampler.py: the seeded, resumable, sharded data order of both training stages."""
import random

import numpy as np
import pytest
import torch

from utils.sampler import InfiniteBatchSampler, SamplerError, SeededSamples


def test_infinite_sampler_shards_and_resumes():
    n, batch = 10, 4
    single = InfiniteBatchSampler(n, batch, seed=3)
    ranks = [InfiniteBatchSampler(n, batch, seed=3, rank=r, world_size=2) for r in (0, 1)]
    it1, itr = iter(single), [iter(s) for s in ranks]
    batches = [next(it1) for _ in range(6)]
    for t, b in enumerate(batches):
        shards = [next(i) for i in itr]
        assert shards[0] + shards[1] == b  # ranks split the global batch in order
        assert b == single.batch(t)
    # 10 // 4 = 2 batches per epoch (drop_last), each epoch a fresh permutation without repeats.
    assert [e for _, e in batches[0]] == [0] * 4 and batches[2][0][1] == 1
    ep0 = [i for b in batches[:2] for i, _ in b]
    assert len(set(ep0)) == 8
    assert batches[0] != batches[2]
    # Starting at iteration 4 gives exactly the batches 4, 5 of the uninterrupted stream.
    late = iter(InfiniteBatchSampler(n, batch, seed=3, start_batch=4))
    assert [next(late), next(late)] == batches[4:6]
    with pytest.raises(SamplerError, match="not divisible"):
        InfiniteBatchSampler(n, 3, seed=0, world_size=2)
    with pytest.raises(SamplerError, match="fewer than"):
        InfiniteBatchSampler(3, 4, seed=0)


def test_seeded_samples_are_reproducible_and_leave_global_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return random.random(), float(np.random.rand()), float(torch.rand(()))

    ds = SeededSamples(Noisy(), seed=1)
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    first = ds[(2, 0)]
    assert ds[(2, 0)] == first and ds[(2, 1)] != first and ds[(3, 0)] != first
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0)
    torch.manual_seed(0)
    np.random.seed(0)
    ds[(4, 2)]
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_seeded_samples_never_touch_the_gpu_generators(monkeypatch):
    """With num_workers 0 the samples are drawn in the training process: reseeding the GPU's
    generator there (torch.manual_seed does) would reset the dropout stream at every image, and
    fork_rng(devices=[]) would not restore it. Only the CPU generator is seeded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return float(torch.rand(()))

    ds = SeededSamples(Draw(), seed=3)
    assert ds[(1, 0)] == ds[(1, 0)]
    assert calls == []
    torch.manual_seed(0)  # the guard sees what torch.manual_seed does
    assert calls
