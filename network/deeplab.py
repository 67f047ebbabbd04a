"""DeepLab-v2 (ResNet-101, ASPP, multi-scale inputs) for the second stage (deeplab-pytorch
libs/models/deeplabv2.py DeepLabV2, libs/models/msc.py MSC; docs/segmentation.md).

The module tree and therefore the state-dict key names follow kazuto1011/deeplab-pytorch, so
its converted Caffe weights load without renaming::

    base.layer1.conv1.conv.weight            [64, 3, 7, 7]   stem 7x7/2 + max-pool 3/2 (ceil)
    base.layer1.conv1.bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    base.layer{2..5}.block{K}.{reduce,conv3x3,increase}.{conv.weight, bn.*}
    base.layer{2..5}.block1.shortcut.{conv.weight, bn.*}      (projection only in block 1)
    base.aspp.c{0..3}.{weight [n, 2048, 3, 3], bias [n]}      rates 6/12/18/24, outputs summed

ResNet-101 has 3/4/23/3 bottlenecks in layer2..layer5; the stride sits in the first 1x1 conv
(MSRA/Caffe style); layer4/layer5 use dilation 2/4 instead of striding, so the output stride is 8
(321 -> 41). ``MSC`` runs the base on the input and on 0.5x / 0.75x copies and takes the pixel-wise
max: training returns ``[L1, L0.5, L0.75, Lmax]``, eval returns ``Lmax``.

``n_classes`` here is the number of output channels *including* background (21 for VOC), as in
deeplab-pytorch; background is channel 0, matching the pseudo-mask PNG values.

Architectures are an explicit registry (``SEG_ARCHS``): the published ResNet-101 and a tiny
``deeplabv2_small`` for the CPU demo and tests (same stem/bottleneck/ASPP/MSC code, narrower and
shallower, trained from scratch with BN trained).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from utils.errors import UserError

log = logging.getLogger(__name__)

EXPANSION = 4  # bottleneck output channels = 4 x its middle width
# Caffe's BatchNorm moving_average_fraction is 0.999, i.e. PyTorch momentum 0.001.
CAFFE_BN_MOMENTUM = 0.001
MSC_SCALES = (0.5, 0.75)
# Accepted input scales of train_seg.py / infer_seg.py (--scales, --msc-scales; as infer.py's
# --scales): a scale near 0 shrinks the input to nothing, a huge one only runs out of memory.
MIN_SCALE, MAX_SCALE = 0.05, 8.0
ASPP_RATES = (6, 12, 18, 24)


@dataclass(frozen=True)
class SegArch:
    """Hyper-parameters of one DeepLab-v2 variant."""
    n_blocks: Tuple[int, int, int, int]
    width: int                      # stem channels; layer widths are 4x, 8x, 16x, 32x this
    atrous_rates: Tuple[int, ...] = ASPP_RATES
    freeze_bn: bool = True          # published: every BN in eval mode, affine never optimized
    bn_momentum: float = CAFFE_BN_MOMENTUM
    description: str = ""


SEG_ARCHS: Dict[str, SegArch] = {
    "deeplabv2_resnet101": SegArch(
        n_blocks=(3, 4, 23, 3), width=64,
        description="published DeepLab-v2 ResNet-101 MSC (deeplab-pytorch DeepLabV2_ResNet101_MSC)"),
    # Tiny CPU variant: BN must learn its statistics from scratch, so it is trained (momentum
    # 0.1); freezing it, as for the ImageNet/COCO-initialised ResNet-101, would leave BN = identity.
    "deeplabv2_small": SegArch(
        n_blocks=(1, 1, 1, 1), width=8, freeze_bn=False, bn_momentum=0.1,
        description="tiny from-scratch variant for the CPU demo and tests (not a paper model)"),
}


class ConvBnReLU(nn.Sequential):
    """conv (no bias) -> BN -> optional ReLU; children named ``conv``/``bn`` as in deeplab-pytorch."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True,
                 bn_momentum=CAFFE_BN_MOMENTUM):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation,
                                          bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=bn_momentum))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    """MSRA bottleneck: the stride is in the first 1x1 (``reduce``), not in the 3x3 as in
    torchvision's ResNet v1.5; the projection shortcut exists only when ``downsample``."""

    def __init__(self, in_ch, out_ch, stride, dilation, downsample, bn_momentum):
        super().__init__()
        mid = out_ch // EXPANSION
        self.reduce = ConvBnReLU(in_ch, mid, 1, stride, 0, 1, True, bn_momentum)
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation, True, bn_momentum)
        self.increase = ConvBnReLU(mid, out_ch, 1, 1, 0, 1, False, bn_momentum)
        self.shortcut = (ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False, bn_momentum)
                         if downsample else nn.Identity())

    def forward(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + self.shortcut(x))


class ResLayer(nn.Sequential):
    """``n`` bottlenecks named block1..blockN; only block1 changes stride/width."""

    def __init__(self, n, in_ch, out_ch, stride, dilation, bn_momentum):
        super().__init__()
        for i in range(n):
            self.add_module(f"block{i + 1}", Bottleneck(
                in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation,
                downsample=(i == 0), bn_momentum=bn_momentum))


class Stem(nn.Sequential):
    def __init__(self, out_ch, bn_momentum):
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1, True, bn_momentum))
        # ceil_mode=True: Caffe pooling rounds up (321 -> 161 -> 81), unlike torchvision's.
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """Four parallel 3x3 convs with dilation = padding = rate, whose outputs are summed."""

    def __init__(self, in_ch, n_classes, rates):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, n_classes, 3, 1, padding=r, dilation=r,
                                               bias=True))
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.children():
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.constant_(m.bias, 0.0)

    def forward(self, x):
        return sum(stage(x) for stage in self.children())


class DeepLabV2(nn.Sequential):
    """The single-scale network (deeplab-pytorch ``DeepLabV2``): layer1..layer5 + aspp, OS 8."""

    def __init__(self, n_classes: int, n_blocks: Sequence[int], atrous_rates: Sequence[int],
                 width: int = 64, bn_momentum: float = CAFFE_BN_MOMENTUM):
        super().__init__()
        ch = [width * 2 ** p for p in range(6)]  # 64, 128, 256, 512, 1024, 2048 for ResNet-101
        self.add_module("layer1", Stem(ch[0], bn_momentum))
        self.add_module("layer2", ResLayer(n_blocks[0], ch[0], ch[2], 1, 1, bn_momentum))
        self.add_module("layer3", ResLayer(n_blocks[1], ch[2], ch[3], 2, 1, bn_momentum))
        self.add_module("layer4", ResLayer(n_blocks[2], ch[3], ch[4], 1, 2, bn_momentum))
        self.add_module("layer5", ResLayer(n_blocks[3], ch[4], ch[5], 1, 4, bn_momentum))
        self.add_module("aspp", ASPP(ch[5], n_classes, atrous_rates))


def msc_max(logits: torch.Tensor, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise max of ``logits`` and each pyramid output resized (bilinear) to its size."""
    out = logits
    for p in pyramid:
        p = F.interpolate(p, size=logits.shape[2:], mode="bilinear", align_corners=False)
        out = torch.maximum(out, p)
    return out


class DeepLabV2MSC(nn.Module):
    """Multi-scale-input wrapper (deeplab-pytorch ``MSC``) around ``base``.

    forward(x): training -> [L1, L0.5, L0.75, Lmax] (one CE term each); eval -> Lmax."""

    def __init__(self, base: DeepLabV2, scales: Sequence[float] = MSC_SCALES,
                 freeze_bn: bool = True, arch: str = ""):
        super().__init__()
        self.base = base
        self.scales = tuple(float(s) for s in scales)
        self.freeze_bn = bool(freeze_bn)
        self.arch = arch
        self.n_classes = base.aspp.c0.out_channels
        if self.freeze_bn:
            # Frozen BN (published): not in the optimizer and never updated; no grad saves memory.
            for m in self.base.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            # deeplab-pytorch: model.train() then base.freeze_bn(); BN keeps the init statistics.
            for m in self.base.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        logits = self.base(x)
        # Same call as upstream: scale_factor (output size floor(h*p)), bilinear, no corners.
        pyramid = [self.base(F.interpolate(x, scale_factor=p, mode="bilinear",
                                           align_corners=False)) for p in self.scales]
        logits_max = msc_max(logits, pyramid)
        if self.training:
            return [logits] + pyramid + [logits_max]
        return logits_max

    def get_parameter_groups(self) -> List[dict]:
        """Published optimizer groups (deeplab-pytorch get_params):

        "1x": every Conv2d parameter under layer1..layer5 (lr 1x, weight decay);
        "10x": ASPP weights (lr 10x, weight decay); "20x": ASPP biases (lr 20x, no decay).
        BN parameters are never optimized when frozen; for a trainable-BN variant they form
        an extra "bn" group (lr 1x, no decay)."""
        g1, g10, g20, gbn = [], [], [], []
        for name, m in self.base.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("aspp"):
                    g10.append(m.weight)
                    g20.append(m.bias)
                elif "layer" in name:
                    g1.extend(m.parameters())
            elif isinstance(m, nn.BatchNorm2d) and not self.freeze_bn:
                gbn.extend(m.parameters())
        groups = [dict(name="1x", params=g1, lr_mult=1, weight_decay_mult=1),
                  dict(name="10x", params=g10, lr_mult=10, weight_decay_mult=1),
                  dict(name="20x", params=g20, lr_mult=20, weight_decay_mult=0)]
        if gbn:
            groups.append(dict(name="bn", params=gbn, lr_mult=1, weight_decay_mult=0))
        return groups


def build_deeplab(arch: str, n_classes: int, *, msc_scales: Sequence[float] = MSC_SCALES,
                  freeze_bn: Optional[bool] = None) -> DeepLabV2MSC:
    """Build a registered DeepLab-v2 MSC model with ``n_classes`` outputs (background included)."""
    if arch not in SEG_ARCHS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; choose one of {sorted(SEG_ARCHS)}")
    if n_classes < 2:
        raise ValueError(f"n_classes counts background too and must be >= 2, got {n_classes}")
    a = SEG_ARCHS[arch]
    base = DeepLabV2(n_classes, a.n_blocks, a.atrous_rates, a.width, a.bn_momentum)
    return DeepLabV2MSC(base, msc_scales, a.freeze_bn if freeze_bn is None else freeze_bn, arch)


# ---------------------------------------------------------------------------------------------
# Weights: initialisation (COCO DeepLab or torchvision ImageNet) and trained checkpoints.

class SegWeightsError(UserError):
    """A weight file does not fit the DeepLab model; the message names the file and the fix."""


def read_state_dict(path, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """Tensor dict from a .pth (network.weights.load_state_dict_file: weights_only, unwraps
    {"model": ...}, strips "module."), with errors as SegWeightsError. ``mmap``: tensors
    memory-mapped, for checks of keys and shapes only."""
    from network.weights import WeightsError, load_state_dict_file
    try:
        return dict(load_state_dict_file(path, mmap=mmap))
    except FileNotFoundError:
        raise SegWeightsError(f"{path}: weight file not found") from None
    except WeightsError as e:
        raise SegWeightsError(str(e)) from None


def aspp_keys(model: DeepLabV2MSC) -> set:
    return {k for k in model.base.state_dict() if k.startswith("aspp.")}


def detect_init_kind(sd: Dict[str, torch.Tensor]) -> str:
    """'deeplab' (deeplab-pytorch names, with or without "base.") or 'torchvision' (ResNet)."""
    keys = set(sd)
    if "layer1.conv1.conv.weight" in keys or "base.layer1.conv1.conv.weight" in keys:
        return "deeplab"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision"
    return "unknown"


# torchvision's ResNet normalisation; the DeepLab pipeline feeds BGR pixels minus the Caffe mean.
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
_TV_BRANCH = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv",
              "bn2": "conv3x3.bn", "conv3": "increase.conv", "bn3": "increase.bn",
              "downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}
_TV_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)$")


def torchvision_to_deeplab(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a torchvision ResNet state dict onto the DeepLab base names.

    Returns (mapped dict, dropped keys = the fc classifier). The first conv is adapted to the
    DeepLab input (BGR, Caffe mean subtracted, 0..255 range, no std): channels reversed and
    divided by 255*std; the mean difference (< 1 grey level) is ignored."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k == "conv1.weight":
            std = torch.tensor(TORCHVISION_STD_RGB, dtype=v.dtype, device=v.device).view(1, 3, 1, 1)
            out["layer1.conv1.conv.weight"] = (v / (255.0 * std)).flip(1)  # RGB -> BGR
        elif k.startswith("bn1."):
            out["layer1.conv1.bn." + k[4:]] = v
        elif (m := _TV_KEY.match(k)):
            layer, block, branch, leaf = m.groups()
            out[f"layer{int(layer) + 1}.block{int(block) + 1}.{_TV_BRANCH[branch]}.{leaf}"] = v
        else:
            dropped.append(k)
    return out, sorted(dropped)


# Keys whose first dimension is a classifier's output count, in the layouts --init accepts:
# deeplab-pytorch's ASPP (trained DeepLab-v2 checkpoints, ours and theirs) and a plain fc (the
# COCO init's 91 rows, torchvision's 1000).
CLASSIFIER_KEYS = ("aspp.c0.weight", "base.aspp.c0.weight", "fc.weight", "base.fc.weight")
SUPERVISED_FLAG = "--allow-supervised-init"


def supervised_classifier(sd: Dict[str, torch.Tensor], n_classes: int) -> Optional[Tuple[str, int]]:
    """(key, rows) of a classifier in ``sd`` with exactly the target's ``n_classes`` outputs
    (background included), i.e. trained on this label set; None otherwise."""
    for key in CLASSIFIER_KEYS:
        v = sd.get(key)
        if v is not None and v.dim() > 0 and int(v.shape[0]) == n_classes:
            return key, int(v.shape[0])
    return None


def check_not_supervised(sd: Dict[str, torch.Tensor], n_classes: int, source: str,
                         allow: bool = False) -> Optional[str]:
    """Refuse an init whose classifier was trained on the target's label set (e.g. deeplab-pytorch's
    deeplabv2_resnet101_msc-vocaug-20000.pth for VOC: 21 ASPP outputs): its backbone learnt from
    the val set's kind of pixel labels, and the 'weakly supervised' val mIoU comes out inflated.
    The paper's init is COCO's (91 outputs) or ImageNet's (1000). With ``allow`` (the explicit
    --allow-supervised-init) it is a warning. Returns the warning text, or None."""
    found = supervised_classifier(sd, n_classes)
    if found is None:
        return None
    key, rows = found
    text = (f"{source}: its classifier {key} has {rows} outputs, the {n_classes} classes of this "
            f"dataset (background included): a DeepLab trained on this label set (e.g. "
            f"deeplab-pytorch's deeplabv2_resnet101_msc-vocaug-20000.pth, trained on VOC's pixel "
            f"labels). Starting from it makes the weakly supervised result a fully supervised one "
            f"and inflates the val mIoU")
    if not allow:
        raise SegWeightsError(f"{text}. Use the paper's init deeplabv1_resnet101-coco.pth (91 "
                              f"outputs, README 'Downloads') or an ImageNet ResNet-101; pass "
                              f"{SUPERVISED_FLAG} (SEG_ARGS for the scripts) if you mean it, e.g. "
                              f"a DeepLab of your own trained on pseudo-masks")
    log.warning("%s; accepted because of %s", text, SUPERVISED_FLAG)
    return text


def load_init_weights(model: DeepLabV2MSC, path, kind: str = "auto",
                      allow_supervised: bool = False) -> dict:
    """Initialise the backbone from the .pth file ``path`` (see load_init_state_dict)."""
    return load_init_state_dict(model, read_state_dict(path), kind, source=str(path),
                                allow_supervised=allow_supervised)


def check_init_file(path, arch: str, n_classes: int, kind: str = "auto",
                    allow_supervised: bool = False) -> dict:
    """Every check load_init_weights makes, without reading weight values or building a real
    model: the file's keys and shapes (memory-mapped) against the architecture on the meta
    device (tools/preflight.py; seconds for a 170 MB file). Raises the SegWeightsError the
    training would meet; returns the report (kind, loaded, new, dropped)."""
    sd = read_state_dict(path, mmap=True)
    with torch.device("meta"):
        model = build_deeplab(arch, n_classes)
    return _map_init(model, sd, kind, str(path), allow_supervised)[1]


def _map_init(model: DeepLabV2MSC, sd: Dict[str, torch.Tensor], kind: str, source: str,
              allow_supervised: bool):
    """(the backbone state dict to load, the report); every check of load_init_state_dict."""
    check_not_supervised(sd, model.n_classes, source, allow_supervised)
    if kind == "auto":
        kind = detect_init_kind(sd)
    if kind == "deeplab":
        sd = {k[len("base."):] if k.startswith("base.") else k: v for k, v in sd.items()}
        dropped = sorted(k for k in sd if k.startswith(("fc.", "aspp.")))
        sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    elif kind == "torchvision":
        sd, dropped = torchvision_to_deeplab(sd)
    else:
        raise SegWeightsError(
            f"{source}: neither deeplab-pytorch keys (layer1.conv1.conv.weight) nor a torchvision "
            f"ResNet (conv1.weight, layer1.0.conv1.weight); pass --init-kind or another file")
    own = model.base.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise SegWeightsError(
            f"{source}: {len(unexpected)} keys do not belong to {model.arch or 'the model'} "
            f"(first: {unexpected[:5]}); is it a ResNet-101 of the expected layout?")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if v.shape != own[k].shape]
    if bad:
        raise SegWeightsError(f"{source}: shape mismatch for {len(bad)} keys, e.g. {bad[:3]}")
    missing = set(own) - set(sd)
    new = aspp_keys(model)
    not_loaded = missing - new - {k for k in missing if k.endswith("num_batches_tracked")}
    if not_loaded or not new <= missing:
        raise SegWeightsError(
            f"{source}: backbone keys missing from the file: {sorted(not_loaded)[:5]} "
            f"(total {len(not_loaded)}); only the ASPP may be new")
    return sd, dict(kind=kind, loaded=len(sd), new=sorted(new), dropped=dropped)


def load_init_state_dict(model: DeepLabV2MSC, sd: Dict[str, torch.Tensor], kind: str = "auto",
                         source: str = "init state dict", allow_supervised: bool = False) -> dict:
    """Initialise the backbone from ``sd``; the ASPP stays new (N(0, 0.01), bias 0).

    * ``deeplab``: deeplab-pytorch layout, e.g. deeplabv1_resnet101-coco.pth (keys without
      "base.", a 91-class ``fc`` classifier). The classifier (``fc.*`` or another ``aspp.*``)
      is dropped; every backbone key must match by name and shape.
    * ``torchvision``: an ImageNet ``resnet101`` state dict, renamed (see torchvision_to_deeplab).

    Refuses a file whose classifier has the target's class count (check_not_supervised) unless
    ``allow_supervised``. Asserts that exactly the ASPP keys are new (num_batches_tracked may
    also be absent from hand-made files) and that only classifier keys are dropped. Returns a
    report dict."""
    sd, report = _map_init(model, sd, kind, source, allow_supervised)
    kind, dropped, new = report["kind"], report["dropped"], set(report["new"])
    missing = set(model.base.state_dict()) - set(sd)
    result = model.base.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == missing and not result.unexpected_keys
    report = dict(kind=kind, loaded=len(sd), new=sorted(new), dropped=dropped)
    log.info("init %s (%s): %d tensors loaded; new: %s; dropped: %s",
             source, kind, len(sd), ", ".join(sorted(new)), ", ".join(dropped) or "none")
    return report


def infer_arch(sd: Dict[str, torch.Tensor]) -> Tuple[str, int]:
    """(arch name, n_classes) of a trained DeepLab MSC state dict ("base."-prefixed keys)."""
    if "base.aspp.c0.weight" not in sd:
        raise SegWeightsError("not a DeepLab-v2 MSC state dict (no base.aspp.c0.weight)")
    n_classes = sd["base.aspp.c0.weight"].shape[0]
    keys = set(sd)
    for name in SEG_ARCHS:
        with torch.device("meta"):  # shapes only, no memory, no init cost
            ref = build_deeplab(name, n_classes).state_dict()
        if set(ref) == keys and all(ref[k].shape == sd[k].shape for k in keys):
            return name, n_classes
    raise SegWeightsError(f"the state dict ({len(sd)} keys) matches none of {sorted(SEG_ARCHS)}")


def load_trained(path, *, msc_scales: Sequence[float] = MSC_SCALES) -> DeepLabV2MSC:
    """Build the architecture a trained checkpoint describes and load it strictly."""
    sd = read_state_dict(path)
    try:
        arch, n_classes = infer_arch(sd)
    except SegWeightsError as e:
        from network.weights import checkpoint_candidates
        if checkpoint_candidates(sd):  # e.g. train.py's checkpoint_cls.pth
            raise SegWeightsError(f"{path}: a classifier checkpoint (train.py / infer.py), not a "
                                  f"DeepLab-v2 one; pass checkpoint_final.pth written by "
                                  f"train_seg.py (or its run directory)") from None
        raise SegWeightsError(f"{path}: {e}; pass checkpoint_final.pth or checkpoint_last.pth "
                              f"written by train_seg.py") from None
    model = build_deeplab(arch, n_classes, msc_scales=msc_scales)
    model.load_state_dict(sd, strict=True)
    return model


if __name__ == "__main__":  # smoke test: python -m network.deeplab
    net = build_deeplab("deeplabv2_small", 21).train()
    outs = net(torch.randn(2, 3, 321, 321))
    print([tuple(o.shape) for o in outs])  # 41, 21, 31, 41
