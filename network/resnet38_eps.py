"""ResNet-38d with the EPS classifier (EPS ``network/resnet38_eps.py``).

C+1 outputs with the background / saliency channel LAST (index C); raw CAMs (no ReLU). Same
frozen layers as the baseline. ``num_classes`` is C (20 for VOC, 80 for COCO); fc8 has C+1 rows.
"""
from __future__ import annotations

import torch

from network.heads import EpsHead
from network.resnet38d import ResNet38d


class ResNet38Eps(EpsHead, ResNet38d):
    """``forward(x)`` → (pred (N, C+1), cam (N, C+1, H/8, W/8)); ``forward_cam(x)`` → raw CAMs."""

    def __init__(self, num_classes: int, *, freeze_bn: bool = True, checkpointing: bool = False):
        super().__init__(num_classes, freeze_bn=freeze_bn, checkpointing=checkpointing)


if __name__ == "__main__":
    # Smoke check: C+1 channels, pred = spatial mean of the CAM, backward works.
    net = ResNet38Eps(20)
    x = torch.randn(2, 3, 64, 64)
    pred, cam = net(x)
    assert pred.shape == (2, 21) and cam.shape == (2, 21, 8, 8)
    assert torch.isfinite(pred).all() and torch.isfinite(cam).all()
    torch.testing.assert_close(pred, cam.mean(dim=(2, 3)))
    (pred.sum() + cam.mean()).backward()
    assert net.fc8.weight.grad is not None and net.b2.conv_branch2a.weight.grad is None
    print("resnet38_eps OK:", tuple(pred.shape), tuple(cam.shape))
