"""Inference-only graph optimisation of a trained classifier (the infer.py fast path on the CPU).

``fuse_for_inference(model)`` returns a *copy* of an eval-mode network whose ``forward_cam``
computes the same CAMs with less memory traffic:

* every BatchNorm that directly follows a convolution (ResNet-38: ``bn_branch2b1`` after
  ``conv_branch2a``, ``bn_branch2b2`` after ``conv_branch2b1`` of the bottlenecks; the small
  net's conv-BN pairs; ResNet-101's) is folded into that convolution's weight and bias
  (eval BN is a per-channel affine, so ``bn(conv(x, W)) = conv(x, W * s) + t`` exactly in real
  arithmetic; fp32 rounding moves results by ~1e-7 relative);
* with ``freeze=True`` (default) the folded graph is traced once on a small input and handed to
  TorchScript's freezing + ``optimize_for_inference``, which on the CPU pre-packs the conv weights
  into oneDNN's blocked layout (no weight reorder per call), keeps activations blocked between
  convs and fuses ReLU / add into the conv kernels. The traced graph has no shape-dependent ops
  (checked on a second input size when built), so one trace serves every image size and scale.

The pre-activation BNs (``bn_branch2a``, ``bn7``) follow a residual sum, not a conv, and stay as
they are. Never used for training: the copy has no gradients and ``train(True)`` raises.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

# Traced graphs are checked against the eager copy at this size (a size the trace did not see).
_CHECK_SIZE = (56, 72)
_CHECK_TOL = 1e-4  # relative to the CAMs' magnitude; real mismatches (baked shapes) are O(1)


class _CamGraph(nn.Module):
    """forward(x) = model.forward_cam(x), so fx / TorchScript see the CAM computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_cam(x)


def fold_conv_bn(model: nn.Module) -> fx.GraphModule:
    """Trace ``model.forward_cam`` with torch.fx and fold every eval BatchNorm whose input is a
    bias-free or biased Conv2d used nowhere else. Returns the folded GraphModule (a new module
    sharing no parameters with ``model``)."""
    gm = fx.symbolic_trace(_CamGraph(copy.deepcopy(model).eval()))
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
            continue
        bn, conv = modules[node.target], modules[src.target]
        if bn.training or not bn.track_running_stats:
            continue  # batch statistics: not an affine, cannot fold
        _set_module(gm, src.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.folded_bn = folded
    return gm


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class FusedNetwork(nn.Module):
    """What :func:`fuse_for_inference` returns: ``forward_cam`` only, plus the head attributes
    infer.py reads (``head_type``, ``num_classes``)."""

    def __init__(self, graph: nn.Module, head_type: str, num_classes: int, description: str):
        super().__init__()
        self.graph = graph
        self.head_type = head_type
        self.num_classes = num_classes
        self.description = description
        super().train(False)

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cam(x)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("a network from fuse_for_inference is for inference only; "
                               "train the original model")
        return super().train(False)

    def extra_repr(self) -> str:
        return self.description


def fuse_for_inference(model: nn.Module, *, freeze: bool = True,
                       trace_size: Tuple[int, int] = (64, 64)) -> FusedNetwork:
    """An inference-only copy of ``model`` (left untouched) with conv-BN folding and, with
    ``freeze``, TorchScript freezing + oneDNN optimisation (CPU). See the module docstring."""
    if not hasattr(model, "forward_cam"):
        raise TypeError(f"{type(model).__name__} has no forward_cam (not a CAM classifier)")
    device = next(model.parameters()).device
    with torch.no_grad():
        gm = fold_conv_bn(model)
        for p in gm.parameters():
            p.requires_grad_(False)
        desc = f"folded {gm.folded_bn} conv-BN pairs"
        graph: nn.Module = gm
        if freeze:
            example = torch.randn(1, 3, *trace_size, device=device)
            with warnings.catch_warnings():
                # torch.jit is in maintenance mode (FutureWarning) but still the only
                # non-compiling way to get pre-packed oneDNN weights and fused conv kernels.
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(gm, example, check_trace=False)
                graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            _check_same(gm, graph, device)
            desc += ", TorchScript frozen + optimize_for_inference"
    return FusedNetwork(graph, model.head_type, model.num_classes, desc)


def _check_same(eager: nn.Module, traced: nn.Module, device: torch.device) -> None:
    """The trace must not have baked in the example's shape: compare at another size."""
    x = torch.randn(1, 3, *_CHECK_SIZE, device=device)
    a, b = eager(x), traced(x)
    scale = max(float(a.abs().max()), 1e-6)
    if a.shape != b.shape or float((a - b).abs().max()) > _CHECK_TOL * scale:
        raise RuntimeError("fuse_for_inference: the traced network disagrees with the eager one "
                           "at another input size (shape-dependent code in forward_cam?); "
                           "use freeze=False or infer.py --no-fuse")
