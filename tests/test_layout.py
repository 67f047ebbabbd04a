"""The layout planner (utils/layout.py) and gradient accumulation in train.py: every training
stage keeps its published effective batch exactly on any number of GPUs."""
from __future__ import annotations

import json

import pytest
import torch

from utils.layout import LayoutError, plan_layout
from utils.sampler import InfiniteBatchSampler

# (what, published effective batch, bound per process and pass)
STAGES = [("classifier", 8, None),    # VOC, data/registry.py
          ("classifier", 16, None),   # COCO
          ("DeepLab", 10, 5)]         # train_seg.py: 5 x 2
HARDWARE = [(g, 1) for g in range(1, 9)] + [(g, 2) for g in range(1, 5)]


@pytest.mark.parametrize("what, effective, bound", STAGES)
@pytest.mark.parametrize("gpus, nodes", HARDWARE)
def test_every_layout_keeps_the_effective_batch(what, effective, bound, gpus, nodes):
    lay = plan_layout(effective, gpus, nodes, what=what, max_per_process=bound)
    assert lay.per_process * lay.processes * lay.accum == effective
    assert lay.procs_per_node <= gpus and lay.processes == lay.procs_per_node * nodes
    if bound is not None:
        assert lay.per_process <= bound
    # fastest: no layout with more processes keeps the batch
    better = [g for g in range(lay.procs_per_node + 1, gpus + 1) if effective % (g * nodes) == 0]
    assert not better
    line = lay.describe()
    assert line.startswith(f"{what} on {lay.procs_per_node} of {gpus} GPUs")
    assert f"{effective} = {lay.per_process} x {lay.processes} x {lay.accum}" in line


def test_the_published_examples():
    assert plan_layout(10, 4, what="DeepLab", max_per_process=5).describe().startswith(
        "DeepLab on 2 of 4 GPUs: 10 = 5 x 2 x 1")
    one = plan_layout(10, 1, what="DeepLab", max_per_process=5)
    assert (one.per_process, one.processes, one.accum) == (5, 1, 2)  # published 5 x 2
    assert "at most 5 per process and pass" in one.reason
    assert "4 processes cannot split 10" in plan_layout(10, 4, max_per_process=5).reason
    # the classifier's default single process is the published one: the whole batch, one pass
    cls = plan_layout(8, 1, what="classifier")
    assert (cls.per_process, cls.processes, cls.accum) == (8, 1, 1) and cls.reason == ""
    two = plan_layout(10, 4, 2, what="DeepLab", max_per_process=5)
    assert two.describe().startswith("DeepLab on 1 of 4 GPUs per node x 2 nodes: 10 = 5 x 2 x 1")


def test_overrides_are_honoured_or_refused_with_what_works():
    lay = plan_layout(10, 8, procs_per_node=2, what="DeepLab", max_per_process=5,
                      override="SEG_NGPUS=2")
    assert lay.procs_per_node == 2 and "SEG_NGPUS=2" in lay.reason
    with pytest.raises(LayoutError, match=r"over 4 processes \(SEG_NGPUS=4\).*use 1, 2, 5, 10"):
        plan_layout(10, 8, procs_per_node=4, what="DeepLab", max_per_process=5,
                    override="SEG_NGPUS=4")
    acc = plan_layout(8, 8, what="classifier", accum=2)  # ITER_SIZE=2: 1 x 4 x 2 is the fastest
    assert (acc.per_process, acc.processes, acc.accum) == (1, 4, 2)
    with pytest.raises(LayoutError, match="NNODES dividing 8"):
        plan_layout(8, 4, 3, what="classifier")


def test_accumulated_passes_cover_the_same_batch():
    """batch t cut into passes, each split over ranks: the union is the one-process batch t."""
    n, batch = 23, 8
    single = InfiniteBatchSampler(n, batch, seed=5)
    for world, accum in ((1, 2), (2, 2), (2, 4), (4, 2)):
        its = [iter(InfiniteBatchSampler(n, batch, seed=5, rank=r, world_size=world, accum=accum))
               for r in range(world)]
        for t in range(6):  # crosses an epoch (2 batches per epoch)
            got = []
            for _ in range(accum):
                for it in its:
                    got += next(it)
            assert sorted(got) == sorted(single.batch(t)), (world, accum, t)
    late = iter(InfiniteBatchSampler(n, batch, seed=5, start_batch=3, accum=2))
    assert next(late) + next(late) == single.batch(3)


def test_train_with_accumulation_matches_one_pass(tmp_path):
    """train.py --iter-size 2 (two passes of 2) against --iter-size 1 (one pass of 4): frozen BN
    and no dropout in small_eps, and every loss term a batch mean, so the losses are equal and
    the weights equal up to float rounding."""
    from test_train import base_argv, final_state, make_tiny_dataset, run_main
    root = make_tiny_dataset(tmp_path / "data", n=8)
    runs = {}
    for a in (1, 2):
        runs[a] = run_main(base_argv(root, tmp_path / "runs", session=f"a{a}", iters=3,
                                     freeze_bn=True, iter_size=a))
    load = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for x, y in zip(load(runs[1]), load(runs[2])):
        for key in ("loss", "loss_cls", "loss_sal"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    s1, s2 = final_state(runs[1]), final_state(runs[2])
    for k in s1:
        if torch.is_tensor(s1[k]):
            torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert "batch 4 = 2 per process x 1 processes x 2 accumulated passes" in \
        (runs[2] / "log.txt").read_text()


def test_train_refuses_an_accumulation_that_does_not_divide(tmp_path):
    import train
    from test_train import base_argv, make_tiny_dataset, run_main
    root = make_tiny_dataset(tmp_path / "data", n=8)
    with pytest.raises(train.TrainingError, match="x 3 accumulated passes"):
        run_main(base_argv(root, tmp_path / "runs", iter_size=3))
