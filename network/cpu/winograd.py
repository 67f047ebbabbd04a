"""Winograd F(2x2, 3x3) convolution for CPU inference (the infer.py fast path).

A 3x3 convolution computes each 2x2 block of outputs from a 4x4 block of inputs with 36
multiply-adds per channel pair. Winograd's minimal filtering algorithm (Lavin & Gray 2016) does it
with 16, as 16 independent matrix products between transformed input tiles and transformed
weights::

    Y_tile = A^T [ (G g G^T) * (B^T d B) ] A        (* = per-component product, summed over C)

so ResNet-38's 3x3 layers (three quarters of its 11 TFLOP per VOC image) run with 2.25x fewer
multiply-adds. The result is the same function; only the fp32 rounding differs (~1e-6 of the
output's magnitude per layer, about 3x that of a direct convolution; see tests/test_winograd.py).
The larger F(4x4, 3x3) would cut the products 4x but is ~30x less accurate, too much for "same
CAMs to 1e-5", so it is not used.

How it is laid out here (all plain torch ops, channels-last throughout):

* dilation d is handled by tiling the dilated grid: a tile's 4x4 inputs are d apart and its 2x2
  outputs are d apart, and the tiles of the d x d phases interleave. Both the tile reads and the
  output writes are then single strided views (no phase reshuffling copies);
* the input transform is 8 elementwise ops and the output transform 20, over strided views,
  written into reused workspace buffers (freshly allocated buffers of this size cost a page
  fault per 4 KiB on every call, which alone ate half of the gain);
* the 16 products are oneDNN matmuls with pre-packed weights (network/cpu/onednn.py), about 2.5x
  the throughput of MKL's ``bmm`` on the AMD EPYC this was measured on. Without oneDNN they
  fall back to ``torch.mm``;
* the conv bias rides on product 5 (component (1, 1)): column 1 of A^T is all ones, so whatever
  is added to that product reaches all four outputs of the tile;
* an optional ReLU is applied in place on the output.

Inference only: :class:`WinogradConv2d` holds transformed constants, no gradients.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from network.cpu import onednn

# Lavin & Gray's F(2x2, 3x3) matrices (interpolation points 0, 1, -1, infinity).
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
BIAS_COMPONENT = 5  # (i, j) = (1, 1): A^T[:, 1] is all ones -> reaches every output of a tile


# Rows of the weight transform processed per float64 product (16 MiB of float64 per chunk).
_TRANSFORM_CHUNK = 1 << 17


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Co, C, 3, 3) -> (16, Co, C): U[4 i + j] = (G g G^T)[i, j], computed in float64.

    As one matrix product per chunk of (o, c) pairs: vec(G g G^T) = (G kron G) vec(g), a (16, 9)
    matrix times the 9 taps. The einsum this replaced gave the same bits and took 3x the time
    and a float64 copy of the whole weight (infer.py builds 24 of these at start-up)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd F(2x2,3x3) needs a (Co, C, 3, 3) weight, got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    k = torch.kron(g, g)  # (16, 9): row 4 i + j, column 3 k + l holds G[i, k] G[j, l]
    co, c = weight.shape[:2]
    taps = weight.detach().reshape(co * c, 9)
    u = torch.empty(16, co * c, dtype=weight.dtype, device=weight.device)
    for s in range(0, co * c, _TRANSFORM_CHUNK):
        u[:, s:s + _TRANSFORM_CHUNK] = k @ taps[s:s + _TRANSFORM_CHUNK].double().t()
    return u.view(16, co, c)


def is_eligible(conv: nn.Module, min_channels: int = 0) -> bool:
    """A conv :func:`winograd_conv2d` computes exactly: 3x3, stride 1, 'same' padding equal to the
    dilation, no groups, zero padding, at least ``min_channels`` input channels."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation[0] == conv.dilation[1] and conv.padding == conv.dilation
            and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels >= min_channels)


# --------------------------------------------------------------------------------------------
# The matrix products: oneDNN with pre-packed weights when this torch has it, else torch.mm.
# --------------------------------------------------------------------------------------------
class _Products:
    """The 16 (T, C) @ (C, Co) products of one layer, bias on component 5."""

    def __init__(self, u: torch.Tensor, bias: Optional[torch.Tensor], use_onednn: bool):
        self.bias = None if bias is None else bias.detach().contiguous()
        self.use_onednn = use_onednn and u.device.type == "cpu" and u.dtype == torch.float32
        if self.use_onednn:
            self.w = [onednn.pack_linear_weight(u[k]) for k in range(16)]
        else:
            self.w = [u[k].t().contiguous() for k in range(16)]  # (C, Co)

    def __call__(self, k: int, v: torch.Tensor) -> torch.Tensor:
        bias = self.bias if k == BIAS_COMPONENT else None
        if self.use_onednn:
            return onednn.linear(v, self.w[k], bias)
        return torch.mm(v, self.w[k]) if bias is None else torch.addmm(bias, v, self.w[k])


# --------------------------------------------------------------------------------------------
# Workspace: the padded input, B^T d (later A^T M, in the same buffer) and B^T d B reuse
# buffers between calls.
# --------------------------------------------------------------------------------------------
_LOCAL = threading.local()


def _workspace(name: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    bufs: Dict[tuple, torch.Tensor] = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (name, like.device, like.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs.pop(key, None)  # free the old one first: these can be hundreds of MB
        # a normal tensor even when first needed under inference_mode, so that later calls
        # outside it (torch.no_grad) may still write into it
        with torch.inference_mode(False):
            buf = bufs[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Free this thread's buffers (they grow to the largest layer seen: about 0.6 GB for
    ResNet-38's b7 at scale 2 of a 500x500 image)."""
    _LOCAL.bufs = {}


# --------------------------------------------------------------------------------------------
# The convolution
# --------------------------------------------------------------------------------------------
def _pad_nhwc(x: torch.Tensor, d: int, hq: int, wq: int) -> torch.Tensor:
    """x (N, C, H, W) -> workspace (N, hq + 2d, wq + 2d, C): x at offset (d, d), zeros around."""
    n, c, h, w = x.shape
    xp = _workspace("pad", (n, hq + 2 * d, wq + 2 * d, c), x)
    xp[:, :d].zero_()
    xp[:, d + h:].zero_()
    xp[:, d:d + h, :d].zero_()
    xp[:, d:d + h, d + w:].zero_()
    xp[:, d:d + h, d:d + w].copy_(x.permute(0, 2, 3, 1))
    return xp


def winograd_conv2d(x: torch.Tensor, products, out_channels: int, dilation: int = 1,
                    relu: bool = False) -> torch.Tensor:
    """Conv2d(3x3, stride 1, padding = dilation = ``dilation``) of ``x`` (N, C, H, W), any memory
    format, with weights given as ``products`` (a :class:`_Products` or any ``(k, V_k) -> M_k``
    callable returning V_k @ U_k^T (+ bias for k = 5)). Returns (N, Co, H, W) channels-last,
    ReLU'd in place if ``relu``."""
    n, c, h, w = x.shape
    d = int(dilation)
    mh, mw = -(-h // (2 * d)), -(-w // (2 * d))  # tile rows / columns per phase
    hq, wq = 2 * d * mh, 2 * d * mw              # output size rounded up to whole tiles
    xp = _pad_nhwc(x, d, hq, wq)
    sn, sh, sw, _ = xp.stride()
    # tile index (m, p) with row m * 2d + p; its element (r, c) sits d * r rows / d * c columns on
    tiles = (n, mh, d, mw, d, c)
    tstride = (sn, 2 * d * sh, sh, 2 * d * sw, sw, 1)
    data = xp.as_strided((4, 4) + tiles, (d * sh, d * sw) + tstride, xp.storage_offset())

    # B^T d (rows), then (B^T d) B (columns); B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
    bt = _workspace("scratch", (4, 4) + tiles, x)
    torch.sub(data[0], data[2], out=bt[0])
    torch.add(data[1], data[2], out=bt[1])
    torch.sub(data[2], data[1], out=bt[2])
    torch.sub(data[1], data[3], out=bt[3])
    v = _workspace("v", (4, 4) + tiles, x)
    torch.sub(bt[:, 0], bt[:, 2], out=v[:, 0])
    torch.add(bt[:, 1], bt[:, 2], out=v[:, 1])
    torch.sub(bt[:, 2], bt[:, 1], out=v[:, 2])
    torch.sub(bt[:, 1], bt[:, 3], out=v[:, 3])

    t = n * mh * d * mw * d
    v = v.view(16, t, c)

    # A^T M (over i), then (A^T M) A (over j); A^T = [[1,1,1,0],[0,1,-1,-1]]. The products
    # M[4i+j] are made one column j at a time: 4 of them alive at once instead of 16 (each is
    # T x Co: ~130 MB for b7 at scale 2 of a VOC image).
    am = _workspace("scratch", (4, 2, t, out_channels), x)  # [j, a]; bt is no longer needed
    for j in range(4):
        m0, m1, m2, m3 = (products(4 * i + j, v[4 * i + j]) for i in range(4))
        torch.add(m0, m1, out=am[j, 0]).add_(m2)
        torch.sub(m1, m2, out=am[j, 1]).sub_(m3)
        del m0, m1, m2, m3
    y = torch.empty((n, mh, 2, d, mw, 2, d, out_channels), dtype=x.dtype, device=x.device)
    # am[j] as (N, mh, a, p, mw, q, Co) to match y[..., b, ...]'s layout with a as dim 2
    s = [am[j].view(2, n, mh, d, mw, d, out_channels).permute(1, 2, 0, 3, 4, 5, 6) for j in range(4)]
    y0, y1 = y[:, :, :, :, :, 0], y[:, :, :, :, :, 1]
    torch.add(s[0], s[1], out=y0).add_(s[2])
    torch.sub(s[1], s[2], out=y1).sub_(s[3])
    if relu:
        y.relu_()
    y = y.view(n, hq, wq, out_channels)
    if hq != h or wq != w:
        y = y[:, :h, :w].contiguous()  # keep the output dense: the next ops expect it
    return y.permute(0, 3, 1, 2)


class WinogradConv2d(nn.Module):
    """Inference-only replacement of an eligible ``nn.Conv2d`` (see :func:`is_eligible`),
    optionally with a following ReLU fused in."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False, use_onednn: Optional[bool] = None):
        super().__init__()
        if not is_eligible(conv):
            raise ValueError(f"not a 3x3 stride-1 'same' conv: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.dilation = conv.dilation[0]
        self.relu = bool(relu)
        if use_onednn is None or use_onednn:
            use_onednn = onednn.available()
        self.products = _Products(transform_weight(conv.weight), conv.bias, use_onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("WinogradConv2d is inference-only (no gradients); run it under "
                               "torch.inference_mode() or torch.no_grad()")
        return winograd_conv2d(x, self.products, self.out_channels, self.dilation, self.relu)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("WinogradConv2d is inference-only")
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, "
                f"relu={self.relu}, onednn={self.products.use_onednn}")
