"""ResNet-101 backbone (torchvision's, layer3/layer4 dilated instead of strided → output stride 8)
with the same two heads. Not in the paper: an alternative trunk whose ImageNet weights are easy
to get (torchvision's ``resnet101-63fe2227.pth`` (V1) or ``resnet101-cd907fc2.pth`` (V2), loaded
from a local path - nothing is downloaded).

Module names are torchvision's (conv1, bn1, layer1..layer4), so a torchvision ImageNet state_dict
loads key for key; its classifier ``fc`` is dropped. Taps: conv4 = layer2 (512 ch), conv5 =
layer3 (1024 ch), conv6 = layer4 (2048 ch), all at 1/8 of the input.

Frozen when freeze_bn (the ImageNet fine-tuning default, mirroring ResNet-38's conv1a + b2*):
the stem (conv1, bn1) and layer1, plus every BN in eval mode with fixed affine parameters.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from network.base import Backbone


class ResNet101(Backbone):
    arch = "resnet101"
    feature_channels = 2048

    def __init__(self, *, freeze_bn: bool = True, checkpointing: bool = False):
        super().__init__(freeze_bn=freeze_bn, checkpointing=checkpointing)
        # Imported here so that `import network` stays light for users of the other nets.
        import torchvision

        # weights=None: never the download API; ImageNet weights come from a local file.
        tv = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.not_training = [self.conv1, self.bn1, self.layer1]

    def _run_layer(self, layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in layer:  # checkpoint granularity: one bottleneck
            x = self._run(block, x)
        return x

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self._run_layer(self.layer1, x)
        conv4 = self._run_layer(self.layer2, x)
        conv5 = self._run_layer(self.layer3, conv4)
        conv6 = self._run_layer(self.layer4, conv5)
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}


if __name__ == "__main__":
    from network.registry import build_network

    x = torch.randn(2, 3, 64, 64)
    cls_net = build_network("resnet101_cls", 20)
    logits = cls_net(x)
    assert logits.shape == (2, 20) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert cls_net.conv1.weight.grad is None and cls_net.layer2[0].conv1.weight.grad is not None
    eps_net = build_network("resnet101_eps", 20)
    pred, cam = eps_net(x)
    assert pred.shape == (2, 21) and cam.shape == (2, 21, 8, 8) and torch.isfinite(cam).all()
    (pred.sum() + cam.mean()).backward()
    print("resnet101 OK:", tuple(logits.shape), tuple(pred.shape), tuple(cam.shape))
