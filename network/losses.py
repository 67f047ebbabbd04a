"""Training losses of the baseline (CAM) classifier and of EPS (EPS module/train.py train_cls /
train_eps, eps.py get_eps_loss; docs/training.md).

Both are pure functions of tensors: no device is hard-coded (the published EPS loss allocated its
masks with ``.cuda()``), so the same code runs on the CPU, a GPU or under DDP.
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F

# Added to EVERY pixel of the class mask in the overlap-ratio denominator (published eps.py), so
# the denominator is |M_c| + 1e-4 * h * w, not |M_c| + 1e-4 (EPS eps.py get_eps_loss).
OVERLAP_EPS = 1e-4


def cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss, mean over images and classes (published cls and eps loss)."""
    return F.multilabel_soft_margin_loss(logits, labels)


def overlap_ratio(class_masks: torch.Tensor, sal_mask: torch.Tensor) -> torch.Tensor:
    """Published "iou_saliency": sum(M_c * S) / sum(M_c + 1e-4) per image and class.

    class_masks (N, C, h, w) and sal_mask (N, 1, h, w) hold 0/1 values. This is the precision of
    the class mask against the saliency mask, not an IoU, despite the published name."""
    inter = (class_masks * sal_mask).flatten(2).sum(-1)
    denom = (class_masks + OVERLAP_EPS).flatten(2).sum(-1)
    return inter / denom


def eps_loss(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float,
             lam: float, return_maps: bool = False
             ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """EPS saliency loss (EPS eps.py get_eps_loss).

    cam: (N, C+1, h, w) raw CAM logits, background channel LAST (index C).
    saliency: (N, 1, H, W) in [0, 1]; nearest-resized to (h, w).
    labels: (N, C) image labels (non-zero = present).
    tau: overlap-ratio threshold that sends a present class to the foreground (0.4 in all scripts).
    lam: weight of the foreground map in the predicted saliency (VOC 0.5, COCO 0.9).

    Returns the MSE loss, and with ``return_maps`` also a dict with the maps for visualisation:
    "fg" (N,1,h,w) summed foreground probabilities, "bg" (N,1,h,w) summed background-set
    probabilities (the published code returns 1 - bg), "sal_pred" the predicted saliency,
    "sal" the resized target, "ratio" (N,C) overlap ratios, "fg_set" / "bg_set" (N,C+1) bool.
    """
    n, c1, h, w = cam.shape
    num_classes = c1 - 1
    if labels.shape != (n, num_classes):
        raise ValueError(f"eps_loss: labels of shape {tuple(labels.shape)} do not match a CAM with "
                         f"{c1} channels (expected ({n}, {num_classes}): C classes + background)")
    # 1. The saliency map is brought to the CAM size by nearest sampling (F.interpolate's default).
    #    Computed in (at least) float32 even under autocast: softmax and MSE of fp16 values lose
    #    the small differences the loss is made of.
    dtype = torch.promote_types(cam.dtype, torch.float32)
    sal = F.interpolate(saliency.to(dtype), size=(h, w), mode="nearest")
    # 2. Softmax over ALL C+1 channels, absent classes included.
    prob = F.softmax(cam.to(dtype), dim=1)
    # 3.-4. Class/background selection carries no gradient: it is made of rounded, detached maps.
    #    torch.round rounds half to even, so a probability of exactly 0.5 becomes 0 (as published).
    with torch.no_grad():
        ratio = overlap_ratio(torch.round(prob[:, :num_classes]), torch.round(sal))
        present = labels.detach() != 0
        passes = ratio > tau
        bg_channel = torch.ones(n, 1, dtype=torch.bool, device=cam.device)
        # Present classes that overlap the salient region enough are foreground; present classes
        # that do not, plus the background channel, are background. Absent classes are in neither.
        fg_set = torch.cat([present & passes, ~bg_channel], dim=1)
        bg_set = torch.cat([present & ~passes, bg_channel], dim=1)
    # 5. Sum the selected probabilities; the gradient flows through the softmax only.
    fg = (prob * fg_set[:, :, None, None].to(prob.dtype)).sum(1, keepdim=True)
    bg = (prob * bg_set[:, :, None, None].to(prob.dtype)).sum(1, keepdim=True)
    sal_pred = lam * fg + (1.0 - lam) * (1.0 - bg)
    # 6. Mean squared error over N * h * w.
    loss = F.mse_loss(sal_pred, sal)
    if not return_maps:
        return loss
    return loss, {"fg": fg, "bg": bg, "sal_pred": sal_pred, "sal": sal, "ratio": ratio,
                  "fg_set": fg_set, "bg_set": bg_set}
