"""ResNet-38d with the baseline CAM classifier (psa / EPS ``network/resnet38_cls.py``).

C outputs; the published recipe starts from the ImageNet ResNet-38 weights with every BN frozen
and conv1a, b2, b2_1, b2_2 frozen. ``num_classes`` is C (20 for VOC, 80 for COCO).
"""
from __future__ import annotations

import torch

from network.heads import ClsHead
from network.resnet38d import ResNet38d


class ResNet38Cls(ClsHead, ResNet38d):
    """``forward(x)`` → logits (N, C); ``forward_cam(x)`` → ReLU CAMs (N, C, H/8, W/8)."""

    def __init__(self, num_classes: int, *, freeze_bn: bool = True, checkpointing: bool = False):
        super().__init__(num_classes, freeze_bn=freeze_bn, checkpointing=checkpointing)


if __name__ == "__main__":
    # Smoke check (deeplab-pytorch style): shapes, finiteness, backward.
    net = ResNet38Cls(20)
    x = torch.randn(2, 3, 64, 64)
    logits = net(x)
    assert logits.shape == (2, 20) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert net.fc8.weight.grad is not None and net.conv1a.weight.grad is None  # conv1a frozen
    with torch.no_grad():
        cam = net.eval().forward_cam(x)
    assert cam.shape == (2, 20, 8, 8) and (cam >= 0).all()
    print("resnet38_cls OK:", tuple(logits.shape), tuple(cam.shape))
