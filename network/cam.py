"""CAM arithmetic of the published ``infer.py`` (EPS infer.py predict_cam / infer_cam_mp), as small
pure functions (docs/inference.md).

Two ways to combine the 8 views (4 scales x {image, horizontal flip}) of one image:

* the *reference* path follows the published code literally, one view at a time:
  per view, the head's non-linearity (``cam_probs``; cls: none, the CAM is already ReLU'd;
  eps: softmax over the C+1 maps at feature resolution) -> bilinear upsample to (H, W) -> keep
  the C class maps -> x label -> un-flip; then sum over the views.
* the *fast* path computes the same numbers with less work. Everything after the per-view
  ReLU/softmax is linear, and bilinear resizing (align_corners=False) commutes with a horizontal
  flip, so for each flip pair

      up(a) * y + flip(up(b)) * y  ==  up(a + flip(b))[keys] * y[keys]

  i.e. the pair is summed at feature resolution (one upsample per scale instead of two) and only
  the K classes present in the image label are upsampled: the published code multiplies the other
  C - K maps by 0 and never writes them. The result equals the reference up to float rounding
  (tests/test_cam.py checks max |diff| <= 1e-5 after normalisation).

Then, in both paths: per-class max normalisation (``/ (max + 1e-5)``) and the pseudo-mask
``argmax([thr; cams])`` with ties going to background (torch.argmax returns the first maximum).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from network.registry import get_head

# Published constants (EPS infer.py).
NORM_EPS = 1e-5          # added to the per-class max in the normalisation
LABEL_EPS = 1e-5         # a class is "present" (kept in the CAM dict) when label > 1e-5
DEFAULT_THR = 0.20       # constant background score of the published pseudo-masks


def present_classes(label: torch.Tensor) -> torch.Tensor:
    """0-based indices (int64) of the classes in a (C,) image label, as the published cam_dict keys."""
    return torch.nonzero(label > LABEL_EPS, as_tuple=False).flatten()


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps to ``size`` = (H, W), align_corners=False as published."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]) if maps.dim() != 4 else maps
    out = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


def view_probs(raw: torch.Tensor, head) -> torch.Tensor:
    """The per-view non-linearity applied before resizing, as the head defines it
    (``Head.cam_probs``: none for cls, whose forward_cam is already ReLU'd; softmax over the C+1
    channels for eps). ``head``: a head name, a head class or a model."""
    return get_head(head).cam_probs(raw)


# --------------------------------------------------------------------------------------------
# Reference path: one view at a time, literally as published.
# --------------------------------------------------------------------------------------------
def published_view_cam(raw: torch.Tensor, size: Sequence[int], label: torch.Tensor,
                       head, flipped: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One view's contribution. ``raw`` is forward_cam of that view, (C,h,w) for cls or (C+1,h,w)
    for eps (background last). Returns (fg (C,H,W), bg (H,W) or None), both un-flipped."""
    head = get_head(head)
    num_classes = label.numel()
    up = upsample(view_probs(raw, head)[None], size)[0]
    fg = up[:num_classes] * label.to(up.dtype)[:, None, None]
    bg = up[num_classes] if head.has_background else None
    if flipped:
        fg = fg.flip(-1)
        bg = bg.flip(-1) if bg is not None else None
    return fg, bg


def combine_views_reference(views: Iterable[Tuple[torch.Tensor, bool]], size: Sequence[int],
                            label: torch.Tensor, head
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """Sum of the per-view CAMs over all views. Returns (sum_fg (C,H,W), sum_bg (H,W) or None,
    number of views)."""
    sum_fg, sum_bg, n = None, None, 0
    for raw, flipped in views:
        fg, bg = published_view_cam(raw, size, label, head, flipped)
        sum_fg = fg if sum_fg is None else sum_fg + fg
        if bg is not None:
            sum_bg = bg if sum_bg is None else sum_bg + bg
        n += 1
    if sum_fg is None:
        raise ValueError("no views to combine")
    return sum_fg, sum_bg, n


# --------------------------------------------------------------------------------------------
# Fast path: one flip pair per call, summed at feature resolution, present classes only.
# --------------------------------------------------------------------------------------------
def combine_flip_pair(raw_pair: torch.Tensor, size: Sequence[int], keys: torch.Tensor,
                      label: torch.Tensor, head
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``raw_pair`` = forward_cam of [image, flipped image], shape (2, C', h, w). Returns the
    pair's summed contribution for the present classes only: (fg (K,H,W), bg (H,W) or None)."""
    head = get_head(head)
    probs = view_probs(raw_pair.float(), head)
    # Un-flip the second view at feature resolution: flip commutes with the bilinear resize.
    pair = probs[0] + probs[1].flip(-1)
    num_classes = label.numel()
    # The background map (if the head has one) follows the C class maps.
    chans = torch.cat([keys, keys.new_tensor([num_classes])]) if head.has_background else keys
    up = upsample(pair.index_select(0, chans.to(pair.device)), size)
    fg = up[:keys.numel()] * label.to(up.device, up.dtype)[keys][:, None, None]
    bg = up[keys.numel()] if head.has_background else None
    return fg, bg


# --------------------------------------------------------------------------------------------
# Normalisation and pseudo-masks (shared by both paths and by evaluate.py threshold sweeps).
# --------------------------------------------------------------------------------------------
def normalize_cams(sum_cam: torch.Tensor) -> torch.Tensor:
    """Per-class max normalisation of (K,H,W) summed CAMs: cam / (max over (H,W) + 1e-5)."""
    if sum_cam.numel() == 0:
        return sum_cam
    return sum_cam / (sum_cam.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def finalize(sum_fg: torch.Tensor, sum_bg: Optional[torch.Tensor], num_views: int,
             label: torch.Tensor, keys: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """From summed CAMs to what is saved: (keys (K,), normalised cams (K,H,W), bg (H,W) or None).

    ``sum_fg`` is (C,H,W) (reference path) or already restricted to ``keys`` (fast path, K rows).
    The background map is the mean EPS background probability over the views (a value in [0,1]);
    it is only used with --bg-from-eps (a deviation: the published code computes and drops it)."""
    if keys is None:
        keys = present_classes(label)
        sum_fg = sum_fg.index_select(0, keys.to(sum_fg.device))
    cams = normalize_cams(sum_fg)
    bg = sum_bg / num_views if sum_bg is not None else None
    return keys, cams, bg


def pseudo_mask(keys, cams, thr: Optional[float] = DEFAULT_THR, bg=None) -> torch.Tensor:
    """Pseudo-mask (H,W) uint8 in 0..C: argmax over [background; cams] where the background score
    is the constant ``thr`` (published) or the map ``bg``; 0 = background, k -> keys[k]+1.
    Ties go to background (first maximum), as in the published code. Accepts numpy or torch."""
    keys = torch.as_tensor(np.asarray(keys) if not torch.is_tensor(keys) else keys).long()
    cams = torch.as_tensor(cams) if not torch.is_tensor(cams) else cams
    if cams.dim() != 3 or cams.shape[0] != keys.numel():
        raise ValueError(f"cams must be (K,H,W) with K = len(keys) = {keys.numel()}, got {tuple(cams.shape)}")
    if bg is None:
        if thr is None:
            raise ValueError("pseudo_mask needs a threshold or a background map")
        bg_score = torch.full((1, *cams.shape[-2:]), float(thr), dtype=cams.dtype, device=cams.device)
    else:
        bg = torch.as_tensor(bg) if not torch.is_tensor(bg) else bg
        bg_score = bg.to(cams.device, cams.dtype).reshape(1, *cams.shape[-2:])
    idx = torch.cat([bg_score, cams], dim=0).argmax(dim=0)
    lut = torch.cat([keys.new_zeros(1), keys + 1]).to(idx.device)
    if lut.max() > 255:
        raise ValueError("more than 255 classes do not fit a uint8 pseudo-mask")
    return lut[idx].to(torch.uint8)
