"""The network registry: an explicit dict from name to class, and the one builder.

| name          | backbone                         | head (fc8 rows)        | frozen by default               |
|---------------|----------------------------------|------------------------|---------------------------------|
| resnet38_cls  | ResNet-38d (psa), OS 8           | baseline CAM (C)       | all BN; conv1a, b2, b2_1, b2_2  |
| resnet38_eps  | ResNet-38d (psa), OS 8           | EPS, bg last (C + 1)   | all BN; conv1a, b2, b2_1, b2_2  |
| resnet101_cls | torchvision ResNet-101, dilated  | baseline CAM (C)       | all BN; conv1, bn1, layer1      |
| resnet101_eps | torchvision ResNet-101, dilated  | EPS, bg last (C + 1)   | all BN; conv1, bn1, layer1      |
| small_cls     | small conv-BN-ReLU (CPU demo)    | baseline CAM (C)       | nothing (BN trains)             |
| small_eps     | small conv-BN-ReLU (CPU demo)    | EPS, bg last (C + 1)   | nothing (BN trains)             |

``num_classes`` is always C, the number of foreground classes (20 VOC, 80 COCO).
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from network.base import Backbone
from network.resnet38_cls import ResNet38Cls
from network.resnet38_eps import ResNet38Eps
from network.resnet101 import ResNet101Cls, ResNet101Eps
from network.small import SmallCls, SmallEps

NETWORKS: Dict[str, Type[Backbone]] = {
    "resnet38_cls": ResNet38Cls,
    "resnet38_eps": ResNet38Eps,
    "resnet101_cls": ResNet101Cls,
    "resnet101_eps": ResNet101Eps,
    "small_cls": SmallCls,
    "small_eps": SmallEps,
}


def normalize_network_name(name: str) -> str:
    """Accept the published module-path spelling: "network.resnet38_eps" → "resnet38_eps"."""
    key = name.strip()
    if key.startswith("network."):
        key = key[len("network."):]
    key = key.lower().replace("-", "_")
    if key not in NETWORKS:
        raise KeyError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    return key


def build_network(name: str, num_classes: int, *, freeze_bn: Optional[bool] = None,
                  checkpointing: bool = False, pretrained=None, **kwargs) -> nn.Module:
    """Build a registered network for ``num_classes`` foreground classes.

    freeze_bn: None = the network's default: True for the ResNets (published: BN in eval mode with
        fixed affine parameters, early layers frozen), False for the small nets (trained from
        scratch). False trains every BN and freezes nothing.
    checkpointing: activation checkpointing of the trunk, one block at a time (less memory, about
        one extra forward pass of time; identical results).
    pretrained: ImageNet weights to initialise the trunk (MXNet .params for ResNet-38, or a .pth);
        fc8 stays new (asserted). For full checkpoints use network.weights.load_weights.
    kwargs: backbone options (small nets: width, blocks, output_stride).
    """
    cls = NETWORKS[normalize_network_name(name)]
    if freeze_bn is None:
        freeze_bn = cls.default_freeze_bn
    model = cls(num_classes, freeze_bn=freeze_bn, checkpointing=checkpointing, **kwargs)
    if pretrained:
        from network.weights import load_pretrained

        load_pretrained(model, pretrained)
    return model
