"""A small conv-BN-ReLU backbone for training from scratch on a CPU (the built-in demo and the
tests). Not in the paper. Same heads, registry and parameter groups as the ResNets; BN trains
(freeze_bn defaults to False for it) and no layer is frozen.

Layout (w = ``width``, each unit = 3x3 conv, BN, ReLU; ``blocks`` extra units per stage):

    stem    3  → w    stride 2
    stage1  w  → 2w   stride 2          (+ blocks units)
    stage2  2w → 4w   stride 2 (1 if output_stride=4)   (+ blocks)  → conv4
    stage3  4w → 8w                     (+ blocks)                  → conv5
    stage4  8w → 8w   (one unit)                                    → conv6

No dilation: on the demo's 96-px images, dilated stages 3-4 gave every CAM a near-global
receptive field and the baseline's maps flooded the image (background IoU ~32 instead of ~66),
which made the CAM-vs-EPS comparison a straw man.

With the defaults (width 16, blocks 1) it has about 0.4 M parameters, and a training step on a
batch of 8 at 96 px takes a fraction of a second on two cores.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from network.base import Backbone


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation,
                              dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int = 1,
           dilation: int = 1) -> nn.Sequential:
    units = [ConvBNReLU(in_channels, out_channels, stride, dilation)]
    units += [ConvBNReLU(out_channels, out_channels, 1, dilation) for _ in range(blocks)]
    return nn.Sequential(*units)


class SmallNet(Backbone):
    arch = "small"
    default_freeze_bn = False
    expects_pretrained = False

    def __init__(self, *, width: int = 16, blocks: int = 1, output_stride: int = 8,
                 freeze_bn: bool = False, checkpointing: bool = False):
        if output_stride not in (4, 8):
            raise ValueError(f"output_stride must be 4 or 8, got {output_stride}")
        if width < 1 or blocks < 0:
            raise ValueError(f"width must be >= 1 and blocks >= 0, got width={width}, blocks={blocks}")
        # Set before Backbone.__init__ because the heads read feature_channels.
        self.feature_channels = 8 * width
        super().__init__(freeze_bn=freeze_bn, checkpointing=checkpointing)
        self.width, self.blocks, self.output_stride = width, blocks, output_stride
        self.stem = ConvBNReLU(3, width, stride=2)
        self.stage1 = _stage(width, 2 * width, blocks, stride=2)
        self.stage2 = _stage(2 * width, 4 * width, blocks, stride=2 if output_stride == 8 else 1)
        self.stage3 = _stage(4 * width, 8 * width, blocks)
        self.stage4 = ConvBNReLU(8 * width, 8 * width)

    def options(self) -> Dict[str, int]:
        return dict(width=self.width, blocks=self.blocks, output_stride=self.output_stride)

    @classmethod
    def options_from_state_dict(cls, sd) -> Dict[str, int]:
        """width and blocks from the shapes; output_stride leaves no trace in the weights, so an
        unrecorded checkpoint is taken to be the default 8."""
        stem = sd.get("stem.conv.weight")
        if stem is None or stem.dim() != 4:
            return {}
        units = {k.split(".")[1] for k in sd if k.startswith("stage1.")}
        return dict(width=int(stem.shape[0]), blocks=max(0, len(units) - 1))

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self._run(self.stem, x)
        x = self._run(self.stage1, x)
        conv4 = self._run(self.stage2, x)
        conv5 = self._run(self.stage3, conv4)
        conv6 = self._run(self.stage4, conv5)
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, width={self.width}, blocks={self.blocks}, "
                f"output_stride={self.output_stride}")


if __name__ == "__main__":
    from network.registry import build_network

    x = torch.randn(4, 3, 96, 96)
    net = build_network("small_eps", 20)
    pred, cam = net(x)
    assert pred.shape == (4, 21) and cam.shape == (4, 21, 12, 12) and torch.isfinite(cam).all()
    (pred.sum() + cam.mean()).backward()
    assert all(p.grad is not None for p in net.parameters())  # from scratch: everything trains
    logits = build_network("small_cls", 20, width=8, output_stride=4)(x)
    assert logits.shape == (4, 20)
    print("small OK:", tuple(pred.shape), tuple(cam.shape),
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
