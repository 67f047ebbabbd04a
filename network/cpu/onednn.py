"""The one place that touches PyTorch's private oneDNN ops (``torch.ops.mkldnn``, the CPU kernels
behind torch.compile's inductor backend), for the CPU inference graph of network/cpu/fuse.py and
network/cpu/winograd.py.

Why not the public ops: on the AMD EPYC these numbers come from, ``torch.mm`` / ``F.linear`` run
fp32 GEMMs through MKL at ~190 GFLOP/s on 2 threads, oneDNN's matmul at 400-500; and eager
``F.conv2d`` re-lays out its weight into oneDNN's blocked format on every call (32 MB for
ResNet-38's b7 1x1 convs), which a weight packed once avoids.

Every caller checks :func:`available` first and has a public-op fallback, so a torch build
without these ops (or a later torch that renames them) is slower, not broken.
"""
from __future__ import annotations

from typing import List, Optional

import torch

# The batch-size hint only picks the packed layout; any number of rows works with it. Measured
# equal speed for 768 .. 11750 rows (the range of ResNet-38's maps over VOC scales 0.5-2).
_ROWS_HINT = 1024


def available() -> bool:
    """True when this torch build has the oneDNN ops used here."""
    try:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32 weight -> oneDNN's packed matmul layout (opaque; for :func:`linear` only)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None,
           relu: bool = False) -> torch.Tensor:
    """x (rows, in) @ W^T (+ bias) (then ReLU) with a weight from :func:`pack_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu" if relu else "none", [], "")


def pack_conv_weight(weight: torch.Tensor, padding: List[int], stride: List[int],
                     dilation: List[int], groups: int) -> torch.Tensor:
    """A conv weight packed for :func:`conv2d`. The packed layout suits the input size oneDNN
    assumes when none is given; at very different sizes the weight is re-packed per call (use
    :func:`linear` for 1x1 stride-1 convs, whose maps vary most)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to_mkldnn(), padding, stride, dilation, groups)


def conv2d(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
           stride: List[int], dilation: List[int], groups: int, relu: bool = False) -> torch.Tensor:
    """Conv2d (then ReLU) with a weight from :func:`pack_conv_weight`; channels-last output."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, padding, stride, dilation, groups, "relu" if relu else "none", [], "")
