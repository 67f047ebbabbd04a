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
  (checked on a second input size when built), so one trace serves every image size and scale;
* with ``winograd=True`` (infer.py's CPU default) instead an eager graph rewritten by
  :func:`optimise_cpu_graph`: 3x3 convs with >= 256 input channels as Winograd F(2x2, 3x3)
  (network/cpu/winograd.py: 2.25x fewer multiply-adds, CAMs within 2.1e-6), every other conv with
  pre-packed oneDNN weights, ReLUs fused into the convs before them, residual sums and the
  remaining ReLUs in place. On the 2-core development CPU this graph is 1.2-1.4x faster per
  view than the frozen one.

The pre-activation BNs (``bn_branch2a``, ``bn7``) follow a residual sum, not a conv, and stay as
they are. Never used for training: the copy has no gradients and ``train(True)`` raises.
"""
from __future__ import annotations

import copy
import logging
import operator
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from network.cpu import onednn
from network.cpu.winograd import WinogradConv2d, is_eligible

logger = logging.getLogger(__name__)

# Traced graphs are checked against the eager copy at this size (a size the trace did not see).
_CHECK_SIZE = (56, 72)
_CHECK_TOL = 1e-4  # relative to the CAMs' magnitude; real mismatches (baked shapes) are O(1)
# Winograd pays off from about 256 input channels on (per layer against the pre-packed direct conv
# on a 2-core AMD EPYC: 512-2048 channels 1.3-1.9x, 256 0.85-1.2x depending on the map size, 128
# 0.7x): ResNet-38's b3-b7 run as Winograd; b2 and conv1a stay direct.
WINOGRAD_MIN_CHANNELS = 256


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


_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return not node.kwargs.get("inplace", False)
    if node.op == "call_method" and node.target == "relu":
        return True
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)


def _fused_relu(node: fx.Node, modules: dict) -> Optional[fx.Node]:
    """The ReLU node that is ``node``'s only user, if any (it can then be fused into node)."""
    users = list(node.users)
    return users[0] if len(users) == 1 and _is_relu(users[0], modules) else None


class PackedConv2d(nn.Module):
    """Inference-only ``nn.Conv2d`` (+ optional fused ReLU) with its weight pre-packed once into
    oneDNN's blocked layout (network/cpu/onednn.py); eager ``F.conv2d`` re-packs it on every call.
    A 1x1 stride-1 conv runs as a oneDNN matmul over the channels-last pixel rows: a packed conv
    weight suits one input size and is re-packed per call at others (measured: b7's 1x1 at 2.5x
    the time on a half-size view), a packed matmul weight suits all. Channels-last output."""

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        """oneDNN's conv takes numeric zero padding only (no 'same' strings, no reflect)."""
        return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        if not self.supports(conv):
            raise ValueError(f"PackedConv2d needs numeric zero padding: {conv}")
        self.pointwise = (conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                          and conv.padding == (0, 0) and conv.groups == 1)
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        w = conv.weight.detach()
        self.weight = (onednn.pack_linear_weight(w.flatten(1)) if self.pointwise
                       else onednn.pack_conv_weight(w, *self.args))
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.out_channels = conv.out_channels
        self.relu = bool(relu)
        self.desc = f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels-last
            y = onednn.linear(rows, self.weight, self.bias, self.relu)
            return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        return onednn.conv2d(x, self.weight, self.bias, *self.args, relu=self.relu)

    def extra_repr(self) -> str:
        return f"{self.desc}, relu={self.relu}"


def optimise_cpu_graph(gm: fx.GraphModule, min_winograd_channels: Optional[int]) -> Dict[str, int]:
    """The eager CPU inference graph (after :func:`fold_conv_bn`), rewritten in place:

    * 3x3 stride-1 'same' convs with >= ``min_winograd_channels`` inputs -> WinogradConv2d
      (None: no Winograd);
    * every other conv -> PackedConv2d (when this torch has the oneDNN ops);
    * a ReLU that is a conv's only user is fused into it; a ReLU whose input has no other user
      runs in place; a residual sum whose conv operand has no other user is accumulated into
      that operand (no fresh tensor: large fresh allocations page-fault on every call).

    Returns counts of each rewrite."""
    modules = dict(gm.named_modules())
    counts = {"winograd": 0, "packed": 0, "fused_relu": 0, "inplace": 0}
    packed_ok = onednn.available()
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d):
            continue
        relu = _fused_relu(node, modules)
        if min_winograd_channels is not None and is_eligible(conv, min_winograd_channels):
            new, key = WinogradConv2d(conv, relu=relu is not None), "winograd"
        elif packed_ok and PackedConv2d.supports(conv):
            new, key = PackedConv2d(conv, relu=relu is not None), "packed"
        else:
            continue
        _set_module(gm, node.target, new)
        modules[node.target] = new
        counts[key] += 1
        if relu is not None:
            relu.replace_all_uses_with(node)
            gm.graph.erase_node(relu)
            counts["fused_relu"] += 1
    fresh = (WinogradConv2d, PackedConv2d)
    for node in list(gm.graph.nodes):
        if _is_relu(node, modules) and node.op == "call_function":
            src = node.args[0]
            # only the fresh output of a BN or conv: never a graph input, a weight, or what an
            # identity-like module (eval Dropout) passes through from elsewhere
            if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(modules.get(src.target), fresh + (_BatchNorm, nn.Conv2d))):
                node.kwargs = {**node.kwargs, "inplace": True}
                counts["inplace"] += 1
        elif node.op == "call_function" and node.target is operator.add and not node.kwargs:
            a, b = node.args
            for own, other in ((b, a), (a, b)):
                if (isinstance(own, fx.Node) and own.op == "call_module"
                        and isinstance(modules.get(own.target), fresh) and len(own.users) == 1
                        and isinstance(other, fx.Node)):
                    with gm.graph.inserting_after(node):
                        acc = gm.graph.call_method("add_", (own, other))
                    node.replace_all_uses_with(acc)
                    gm.graph.erase_node(node)
                    counts["inplace"] += 1
                    break
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return counts


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class FusedNetwork(nn.Module):
    """What :func:`fuse_for_inference` returns: ``forward_cam`` only, plus what the CAM math
    reads from the network: its ``head`` (the head class: ``cam_probs``, ``has_background``)
    and ``num_classes``."""

    def __init__(self, graph: nn.Module, head: type, num_classes: int, description: str,
                 channels_last: bool = False):
        super().__init__()
        self.graph = graph
        self.channels_last = channels_last  # the Winograd graph wants NHWC input
        self.head = head
        self.num_classes = num_classes
        self.description = description
        super().train(False)

    @property
    def head_type(self) -> str:
        return self.head.name

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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


def fuse_for_inference(model: nn.Module, *, freeze: bool = True, winograd: bool = False,
                       min_winograd_channels: Optional[int] = None,
                       trace_size: Tuple[int, int] = (64, 64)) -> FusedNetwork:
    """An inference-only copy of ``model`` (left untouched) with conv-BN folding, then either
    (``winograd``, CPU) the eager graph of :func:`optimise_cpu_graph` or (``freeze``) TorchScript
    freezing + oneDNN optimisation. ``min_winograd_channels`` defaults to
    ``WINOGRAD_MIN_CHANNELS``. See the module docstring."""
    if not hasattr(model, "forward_cam"):
        raise TypeError(f"{type(model).__name__} has no forward_cam (not a CAM classifier)")
    device = next(model.parameters()).device
    with torch.no_grad():
        gm = fold_conv_bn(model)
        for p in gm.parameters():
            p.requires_grad_(False)
        desc = f"folded {gm.folded_bn} conv-BN pairs"
        graph: nn.Module = gm
        channels_last = False
        if winograd:
            if device.type != "cpu":
                raise ValueError("the Winograd inference graph is CPU-only")
            if min_winograd_channels is None:
                min_winograd_channels = WINOGRAD_MIN_CHANNELS
            x = _check_input(device)
            expected = gm(x)  # the folded graph before the rewrite is the reference
            counts = optimise_cpu_graph(gm, min_winograd_channels)
            desc += (f", {counts['winograd']} convs as Winograd F(2x2,3x3) (>= "
                     f"{min_winograd_channels} channels), {counts['packed']} pre-packed oneDNN "
                     f"convs, {counts['fused_relu']} ReLUs fused, {counts['inplace']} ops in place")
            channels_last = True
            _check_same(expected, gm(x))
        elif freeze:
            example = torch.randn(1, 3, *trace_size, device=device)
            with warnings.catch_warnings():
                # torch.jit is in maintenance mode (FutureWarning) but still the only
                # non-compiling way to get pre-packed oneDNN weights and fused conv kernels.
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(gm, example, check_trace=False)
                graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            x = _check_input(device)
            _check_same(gm(x), graph(x))
            desc += ", TorchScript frozen + optimize_for_inference"
    from network.registry import get_head
    return FusedNetwork(graph, get_head(model), model.num_classes, desc, channels_last)


def _check_input(device: torch.device) -> torch.Tensor:
    return torch.randn(1, 3, *_CHECK_SIZE, device=device)


def _check_same(expected: torch.Tensor, got: torch.Tensor) -> None:
    """The rewritten graph must compute the same CAMs, and a trace must not have baked in the
    example's shape: both are compared on :func:`_check_input`, a size the trace did not see."""
    scale = max(float(expected.abs().max()), 1e-6)
    if expected.shape != got.shape or float((expected - got).abs().max()) > _CHECK_TOL * scale:
        raise RuntimeError("fuse_for_inference: the optimised network disagrees with the eager one "
                           "at another input size (shape-dependent code in forward_cam?); "
                           "use freeze=False, winograd=False or infer.py --no-fuse")
