"""Heads: a head defines the method. The two of the paper live here; a new method is one more
file like this one plus one line in ``network/registry.py`` (docs/extending.md walks through it).

A head is a mix-in that the registry combines with a backbone (``network/base.py``) into one
``nn.Module``, so the state-dict keys stay the published flat names (``conv1a.weight`` ...
``fc8.weight``: the head's modules are registered after the trunk's). Everything the rest of the
code needs to know about a method is declared here, as class attributes and methods, never by
comparing method names:

==========================  ==================================================================
``name``                    registry key, the suffix of the network names (``resnet38_eps``)
``out_channels(C)``         how many maps ``forward_cam`` returns for C foreground classes
``__init__``                builds the head's modules after the trunk and lists the new ones in
                            ``from_scratch_layers`` (the 10x / 20x learning-rate groups)
``forward(x)``              the training output, passed to ``losses`` as ``out``
``forward_cam(x)``          raw maps (N, out_channels(C), h, w) for inference; the CPU graph
                            (network/cpu) traces it, and runs it eager (with a warning) when
                            it has Python that torch.fx cannot trace
``class_scores(x)``         the C multi-label logits of an image batch, those the
                            classification loss trains (sigmoid = the class probabilities);
                            ``infer.py --labels predicted`` thresholds them. Optional: a head
                            without it cannot run without image labels
``needs_saliency``          training batches carry a saliency map (the EPS dataset)
``has_background``          ``cam_probs`` ends with a background map after the C class maps
``cam_probs(raw)``          the per-view non-linearity of inference, applied before resizing:
                            raw maps -> C class maps (+ the background map)
``losses(out, labels,       the training losses of one batch, as a dict of named terms whose
saliency, **hparams)``      sum is minimised (logged as ``loss_<term>``)
``add_args(parser)`` /      the head's own hyper-parameter flags (train.py shows them) and the
``hparams``                 argument names ``losses`` receives
``check_hparams(**hp)``     a one-line problem with their values, or None
``classifier_key``          the state-dict key with ``out_channels(C)`` rows (default
                            ``fc8.weight``), from which ...
``num_classes_from_state_   ... C of an unrecorded checkpoint of this head is read (used to
dict(sd)``                  identify checkpoints by shape)
==========================  ==================================================================
"""
from __future__ import annotations

import argparse
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from network.base import Backbone
from network.losses import cls_loss, eps_loss

HEAD_PREFIX = "fc8."  # the classifier of both published heads; ImageNet files never have it


def make_fc8(in_channels: int, out_channels: int) -> nn.Conv2d:
    fc8 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    nn.init.xavier_uniform_(fc8.weight)  # published init; ImageNet loading leaves fc8 at this
    return fc8


class Head(Backbone):
    """The contract of a head (see the module docstring). Subclasses build their modules in
    ``__init__`` after calling ``super().__init__(**backbone_kwargs)``, which builds the trunk."""

    name: str = ""
    needs_saliency: bool = False
    has_background: bool = False
    hparams: Tuple[str, ...] = ()
    # The state-dict key whose first dimension is out_channels(C): how C is read from a checkpoint
    # that carries no record (released files). A head whose classifier is not fc8 names its own.
    classifier_key: str = HEAD_PREFIX + "weight"

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(**backbone_kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.num_classes = int(num_classes)

    @property
    def head_type(self) -> str:
        """The head's registry name ("cls", "eps", ...), for logs and records only."""
        return self.name

    @classmethod
    def out_channels(cls, num_classes: int) -> int:
        raise NotImplementedError

    @classmethod
    def num_classes_from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Optional[int]:
        """C for a checkpoint of this head: the C whose ``out_channels(C)`` is the row count of
        ``classifier_key``; None when the key is absent or no C fits."""
        weight = sd.get(cls.classifier_key)
        if weight is None or weight.dim() == 0:
            return None
        rows = int(weight.shape[0])
        # Any out_channels(C) >= C (C maps, C+1, 2C, ...): the search is over 1..rows.
        return next((c for c in range(1, rows + 1) if cls.out_channels(c) == rows), None)

    @staticmethod
    def cam_probs(raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) multi-label logits of the classes (call in eval mode)."""
        raise NotImplementedError(f"the {self.name!r} head declares no class_scores(x)")

    def losses(self, out, labels: torch.Tensor, saliency: Optional[torch.Tensor] = None,
               **hparams) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add this head's hyper-parameter flags (default: none)."""

    @staticmethod
    def check_hparams(**hparams) -> Optional[str]:
        """A one-line problem with the hyper-parameter values, or None (checked before any
        compute)."""
        return None


class ClsHead(Head):
    """Baseline CAM classifier (psa / EPS ``network/resnet38_cls.py`` ``Net``): C outputs;
    dropout7, global average pooling, then fc8 (1x1 conv, no bias). ``forward`` -> logits
    (N, C); ``forward_cam`` -> ReLU(fc8 applied to the feature map) (N, C, h, w)."""

    name = "cls"

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(num_classes, **backbone_kwargs)
        self.dropout7 = nn.Dropout2d(0.5)
        self.fc8 = make_fc8(self.feature_channels, self.out_channels(self.num_classes))
        self.from_scratch_layers = [self.fc8]
        self.train()  # apply the freezing now, so a fresh model is already in its training state

    @classmethod
    def out_channels(cls, num_classes: int) -> int:
        return num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.dropout7(self.forward_features(x))
        f = f.mean(dim=(2, 3), keepdim=True)  # global average pooling before fc8, as published
        return self.fc8(f).flatten(1)

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        # No dropout here (published forward_cam): CAMs come from the full feature map.
        return F.relu(F.conv2d(self.forward_features(x), self.fc8.weight))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)  # the logits of the loss (dropout7 is off in eval mode)

    @staticmethod
    def cam_probs(raw: torch.Tensor) -> torch.Tensor:
        # forward_cam is already ReLU'd; the published infer.py upsamples it as it is.
        return raw

    def losses(self, out, labels, saliency=None, **hparams):
        return {"cls": cls_loss(out.float(), labels)}


class EpsHead(Head):
    """EPS classifier (EPS ``network/resnet38_eps.py`` ``Net``): C+1 outputs with the
    background / saliency channel LAST (index C); fc8 on the feature map first, then global
    average pooling; raw CAMs (no ReLU), no dropout7. ``forward`` -> (pred (N, C+1), cam
    (N, C+1, h, w)); ``forward_cam`` -> raw CAMs."""

    name = "eps"
    needs_saliency = True
    has_background = True
    hparams = ("tau", "lam")

    def __init__(self, num_classes: int, **backbone_kwargs):
        super().__init__(num_classes, **backbone_kwargs)
        self.fc8 = make_fc8(self.feature_channels, self.out_channels(self.num_classes))
        self.from_scratch_layers = [self.fc8]
        self.train()

    @classmethod
    def out_channels(cls, num_classes: int) -> int:
        return num_classes + 1

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cam = self.fc8(self.forward_features(x))  # no ReLU: the EPS loss takes a softmax of raw CAMs
        pred = cam.mean(dim=(2, 3))
        return pred, cam

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.forward_features(x))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0][:, :-1]  # the C class logits, background channel dropped

    @staticmethod
    def cam_probs(raw: torch.Tensor) -> torch.Tensor:
        # EPS infer.py: softmax over the C+1 maps at feature resolution, before upsampling.
        return torch.softmax(raw, dim=-3)

    def losses(self, out, labels, saliency=None, *, tau: float, lam: float, **hparams):
        pred, cam = out
        if saliency is None:
            raise ValueError("the EPS loss needs the saliency maps of the batch")
        # EPS module/train.py: the background channel (last) has no image label, so the
        # classification loss covers the C classes only; loss = cls + sal with weight 1.
        return {"cls": cls_loss(pred[:, :-1].float(), labels),
                "sal": eps_loss(cam, saliency, labels, tau, lam)}

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--tau", type=float, default=None,
            help="EPS overlap-ratio threshold for foreground classes, in [0, 1] (published "
                 "scripts: 0.4; main.py default 0.5). Default: the dataset's recipe")
        parser.add_argument(
            "--lam", type=float, default=None,
            help="EPS weight of the foreground map in the predicted saliency, in [0, 1] "
                 "(published: VOC 0.5, COCO 0.9). Default: the dataset's recipe")

    @staticmethod
    def check_hparams(tau: float, lam: float, **hparams) -> Optional[str]:
        if not (0 <= tau <= 1 and 0 <= lam <= 1):  # also refuses NaN
            return "--tau and --lam must be in [0, 1]"
        return None
