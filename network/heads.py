"""The two classifier heads of the paper, usable on any :class:`~network.base.Backbone`.

* :class:`ClsHead`: the baseline CAM classifier (psa ``resnet38_cls.Net``): C outputs;
  dropout7, global average pooling, then fc8 (1x1 conv, no bias). CAMs are ReLU(fc8 applied to
  the feature map).
* :class:`EpsHead`: the EPS classifier (``resnet38_eps.Net``): C+1 outputs, the background /
  saliency channel LAST (index C); fc8 on the feature map first, then global average pooling;
  CAMs are raw (no ReLU). No dropout7.

A concrete network inherits a head first and a backbone second (``class X(EpsHead, ResNet38d)``),
so the head's modules are registered after the trunk's, as in the published state_dict.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from network.base import Backbone


def _make_fc8(in_channels: int, out_channels: int) -> nn.Conv2d:
    fc8 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    nn.init.xavier_uniform_(fc8.weight)  # published init; ImageNet loading leaves fc8 at this
    return fc8


class ClsHead(Backbone):
    """Baseline CAM classifier: ``forward`` → logits (N, C); ``forward_cam`` → ReLU CAMs (N, C, h, w)."""

    head_type = "cls"

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(**backbone_kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = int(num_classes)
        self.dropout7 = nn.Dropout2d(0.5)
        self.fc8 = _make_fc8(self.feature_channels, self.num_classes)
        self.from_scratch_layers = [self.fc8]
        self.train()  # apply the freezing now, so a freshly built model is already in its training state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.dropout7(self.forward_features(x))
        f = f.mean(dim=(2, 3), keepdim=True)  # global average pooling before fc8, as published
        return self.fc8(f).flatten(1)

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        # No dropout here (published): CAMs come from the full feature map.
        return F.relu(F.conv2d(self.forward_features(x), self.fc8.weight))


class EpsHead(Backbone):
    """EPS classifier: ``forward`` → (pred (N, C+1), cam (N, C+1, h, w)); ``forward_cam`` → raw
    CAMs (N, C+1, h, w). Channel C (the last) is the background; ``num_classes`` is C."""

    head_type = "eps"

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(**backbone_kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = int(num_classes)
        self.fc8 = _make_fc8(self.feature_channels, self.num_classes + 1)
        self.from_scratch_layers = [self.fc8]
        self.train()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cam = self.fc8(self.forward_features(x))  # no ReLU: the EPS loss takes a softmax over raw CAMs
        pred = cam.mean(dim=(2, 3))
        return pred, cam

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.forward_features(x))
