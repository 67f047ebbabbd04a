"""ResNet-38d (Wu, Shen & van den Hengel, "Wider or deeper", model A1), exactly as in psa/EPS
``network/resnet38d.py`` ``Net``: pre-activation blocks, output stride 8 (strides only
in conv1a's three successors b2/b3/b4; b5 dilation 2, b6/b7 dilation 4), Dropout2d inside the two
bottleneck blocks, and the module names of the released checkpoints, registered in their order.

Also here: the renaming of the ImageNet MXNet ``.params`` names to this trunk (psa
network/resnet38d.py convert_mxnet_to_torch).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from network.base import Backbone


class ResBlock(nn.Module):
    """Pre-activation basic block: two 3x3 convs; the shortcut is a 1x1 conv of the
    BN-ReLU'd input when the shape changes, else the raw input. forward returns
    (output, x_bn_relu) - the second is the ``conv4``/``conv5`` tap for b5/b6."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: Optional[int] = None, dilation: int = 1):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        if first_dilation is None:
            first_dilation = dilation
        # Registration order = published state_dict order.
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        branch2 = F.relu(self.bn_branch2a(x))
        x_bn_relu = branch2
        # Pre-activation: the projection shortcut sees the BN-ReLU'd input, the identity one the raw input.
        branch1 = self.conv_branch1(branch2) if not self.same_shape else x
        branch2 = self.conv_branch2a(branch2)
        branch2 = F.relu(self.bn_branch2b1(branch2))
        branch2 = self.conv_branch2b1(branch2)
        return branch1 + branch2, x_bn_relu


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck (1x1 → 3x3 → 1x1, widths out/4, out/2, out) with Dropout2d
    before the 3x3 and before the last 1x1 (psa applies it twice; ademxapp only once - we follow
    psa). The shortcut is always a 1x1 conv of the BN-ReLU'd input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        branch2 = F.relu(self.bn_branch2a(x))
        x_bn_relu = branch2
        branch1 = self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = self.dropout_2b1(F.relu(self.bn_branch2b1(branch2)))
        branch2 = self.conv_branch2b1(branch2)
        branch2 = self.dropout_2b2(F.relu(self.bn_branch2b2(branch2)))
        branch2 = self.conv_branch2b2(branch2)
        return branch1 + branch2, x_bn_relu


class ResNet38d(Backbone):
    """The ResNet-38d trunk. ``forward_as_dict`` returns conv4 (512 ch, b5's BN-ReLU input),
    conv5 (1024 ch, b6's BN-ReLU input) and conv6 (4096 ch, relu(bn7(b7))), all at 1/8 of the
    input (448 → 56, 321 → 41). Frozen when freeze_bn: conv1a, b2, b2_1, b2_2 and every BN."""

    arch = "resnet38"
    feature_channels = 4096

    def __init__(self, *, freeze_bn: bool = True, checkpointing: bool = False):
        super().__init__(freeze_bn=freeze_bn, checkpointing=checkpointing)
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)

        # From here on, dilation instead of stride keeps output stride 8.
        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = ResBlockBot(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = ResBlockBot(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

        self.not_training = [self.conv1a, self.b2, self.b2_1, self.b2_2]

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        run = self._run
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = run(block, x)[0]
        x, conv4 = run(self.b5, x)
        x = run(self.b5_1, x)[0]
        x = run(self.b5_2, x)[0]
        x, conv5 = run(self.b6, x)
        x = run(self.b7, x)[0]
        conv6 = F.relu(self.bn7(x))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}


# ------------------------------------------------------------------------------------------------
# MXNet (ademxapp) → PyTorch names (psa network/resnet38d.py convert_mxnet_to_torch)
# ------------------------------------------------------------------------------------------------
MXNET_CLASSIFIER_PREFIX = "linear1000"  # the ImageNet classifier; not part of the trunk
_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_var": "running_var"}
_BLOCK_RE = re.compile(r"^(res|bn)(\d+)(a|b\d+)_(branch1|branch2a|branch2b1|branch2b2)_"
                       r"(weight|gamma|beta|moving_mean|moving_var)$")


def mxnet_name_to_torch(name: str) -> Optional[str]:
    """Map one ademxapp parameter name to its ResNet38d state_dict key; None for the ImageNet
    classifier (dropped). ``arg:``/``aux:`` prefixes are ignored. Raises KeyError for a name the
    A1 model does not have (so a wrong file fails loudly instead of loading half the trunk).

    Examples: conv1a_weight → conv1a.weight; res4b3_branch2b1_weight → b4_3.conv_branch2b1.weight;
    bn5a_branch2a_moving_var → b5.bn_branch2a.running_var; bn7_gamma → bn7.weight.
    """
    key = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if key.startswith(MXNET_CLASSIFIER_PREFIX + "_"):
        return None
    if key == "conv1a_weight":
        return "conv1a.weight"
    m = re.match(r"^bn7_(gamma|beta|moving_mean|moving_var)$", key)
    if m:
        return "bn7." + _BN_SUFFIX[m.group(1)]
    m = _BLOCK_RE.match(key)
    if m is None:
        raise KeyError(f"not a ResNet-38 (ademxapp A1) parameter name: {name!r}")
    kind, level, sub, branch, suffix = m.groups()
    # 'a' is the first block of a level (b4), 'b<k>' the k-th after it (b4_k).
    block = f"b{level}" if sub == "a" else f"b{level}_{sub[1:]}"
    if kind == "res":
        if suffix != "weight":
            raise KeyError(f"unexpected conv parameter {name!r} (convs have weights only)")
        return f"{block}.conv_{branch}.weight"
    if suffix == "weight":
        raise KeyError(f"unexpected BN parameter {name!r}")
    return f"{block}.bn_{branch}.{_BN_SUFFIX[suffix]}"


def convert_mxnet_to_torch(params: Mapping[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Rename an ademxapp parameter dict (as read by network.mxnet_params.load_params) to the
    ResNet38d trunk: float32 tensors under the 191 trunk keys, the ImageNet classifier dropped.
    Shapes are not checked here (the caller compares against a model). Float32 input arrays are
    shared with the returned tensors, not copied (the file is 420 MB)."""
    out: Dict[str, torch.Tensor] = {}
    for name, array in params.items():
        key = mxnet_name_to_torch(name)
        if key is None:
            continue
        if key in out:
            raise KeyError(f"two MXNet parameters map to {key!r} (the second is {name!r})")
        # No copy when the array is already a writable float32 block (the reader's output is).
        out[key] = torch.from_numpy(np.require(array, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    return out


if __name__ == "__main__":
    # Smoke check (deeplab-pytorch style): trunk taps, both heads' shapes, freezing, backward.
    from network.registry import build_network

    net = ResNet38d().eval()
    with torch.no_grad():
        feats = net.forward_as_dict(torch.randn(1, 3, 64, 64))
    assert feats["conv4"].shape == (1, 512, 8, 8), feats["conv4"].shape
    assert feats["conv5"].shape == (1, 1024, 8, 8), feats["conv5"].shape
    assert feats["conv6"].shape == (1, 4096, 8, 8), feats["conv6"].shape
    keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 191, len(keys)
    x = torch.randn(2, 3, 64, 64)
    cls_net = build_network("resnet38_cls", 20)
    logits = cls_net(x)
    assert logits.shape == (2, 20) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert cls_net.fc8.weight.grad is not None and cls_net.conv1a.weight.grad is None  # frozen
    eps_net = build_network("resnet38_eps", 20)
    pred, cam = eps_net(x)
    assert pred.shape == (2, 21) and cam.shape == (2, 21, 8, 8)
    torch.testing.assert_close(pred, cam.mean(dim=(2, 3)))
    (pred.sum() + cam.mean()).backward()
    assert eps_net.fc8.weight.grad is not None and eps_net.b2.conv_branch2a.weight.grad is None
    print("resnet38d OK:", {k: tuple(v.shape) for k, v in feats.items()}, tuple(logits.shape),
          tuple(cam.shape))
