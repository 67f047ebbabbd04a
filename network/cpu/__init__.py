"""The CPU inference graph of a trained classifier, behind one call: :func:`fastest_cpu_graph`.

Three graphs compute the same CAMs (tests/test_fuse.py, tests/test_winograd.py); this package
picks the fastest one that builds and passes its own check, falling back loudly to the next:

1. ``winograd`` (default): conv-BN folded, 3x3 convs with >= 256 channels as Winograd
   F(2x2,3x3), the other convs with pre-packed oneDNN weights (fuse.py, winograd.py, onednn.py);
2. ``frozen``: conv-BN folded, TorchScript-frozen with pre-packed oneDNN weights (fuse.py);
3. ``eager``: the network itself (channels_last unless asked otherwise).
"""
from __future__ import annotations

import logging
from typing import List

import torch
from torch import nn

logger = logging.getLogger(__name__)

GRAPHS = ("winograd", "frozen", "eager")


def graphs_to_try(fuse: bool, winograd: bool) -> List[str]:
    """The graphs to try in order, as infer.py's --fuse / --winograd flags ask."""
    if not fuse:
        return ["eager"]
    return (["winograd"] if winograd else []) + ["frozen", "eager"]


def fastest_cpu_graph(model: nn.Module, *, fuse: bool = True, winograd: bool = True,
                      channels_last: bool = True) -> nn.Module:
    """The fastest correct CPU inference module for ``model`` (an eval-mode classifier, left
    untouched): an object with ``forward_cam`` and the model's ``head`` / ``num_classes``.
    A graph that fails to build or to match the eager network falls back to the next one with a
    warning (speed only: every graph computes the same CAMs)."""
    from network.cpu.fuse import fuse_for_inference

    order = graphs_to_try(fuse, winograd)
    for name in order:
        if name == "eager":
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            return model.eval().to(memory_format=fmt)
        try:
            return fuse_for_inference(model.eval(), winograd=name == "winograd")
        except Exception as e:  # noqa: BLE001 - speed only: any failure falls back, loudly
            nxt = order[order.index(name) + 1]
            logger.warning("could not build the %s CPU graph (%s: %s); falling back to the %s one "
                           "(infer.py %s skips this attempt)", name, type(e).__name__, e, nxt,
                           "--no-winograd" if name == "winograd" else "--no-fuse")
    raise AssertionError("unreachable: the eager graph always builds")
