"""What every classification network here shares, whatever its backbone:

* the published freezing (psa network/resnet38d.py Net.train): ``train(mode)``
  keeps every BatchNorm in eval mode
  with fixed affine parameters and freezes the early layers listed in ``not_training``;
* the published parameter groups (1x / 2x / 10x / 20x learning rate) from one method, for any
  mix of convolutions, linear layers, norms and free parameters (embeddings);
* the optimizer recipe (``optimizer_recipe``): the published SGD unless the backbone declares
  another (network/vit.py: AdamW with layer-wise lr decay);
* optional activation checkpointing of the trunk, one block at a time.

A backbone subclasses :class:`Backbone` and implements ``forward_as_dict`` (returning at least
``"conv6"``, the feature map the heads use, at ``output_stride``; the name is the published
ResNet-38's last layer, whatever the trunk). A head (``network/heads.py``) subclasses it as well,
and the registry (``network/registry.py``) composes the two into one class, e.g. resnet38_eps =
``EpsHead`` + ``ResNet38d``, so the state_dict keys are the published flat names
(``conv1a.weight``, ..., ``fc8.weight``) with no ``backbone.`` prefix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

# name, lr multiplier, weight-decay multiplier: the published groups g0..g3 (module/optimizer.py).
PARAM_GROUPS = (("1x", 1, 1), ("2x", 2, 0), ("10x", 10, 1), ("20x", 20, 0))
# Free parameters a backbone names in ``no_weight_decay`` (position embeddings, class tokens):
# lr x1 without weight decay. Added only when not empty, so the ResNets keep the published four.
NO_DECAY_GROUP = ("1x_no_decay", 1, 0)
NORM_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class OptimizerRecipe:
    """How train.py optimizes a network of this backbone. The default is the published one: SGD
    (utils/optim.build_optimizer, with the momentum quirk) and the dataset's --lr / --wt-dec.
    ``lr`` / ``weight_decay`` set: the defaults of --lr / --wt-dec for this backbone (the flags
    still override them). ``warmup_fraction``: the default --warmup-iters is that fraction of
    --max-iters, during which the lr rises linearly from ``warmup_ratio`` x lr (then poly decay,
    utils/optim.warmup_poly_lr). ``source`` names where the values come from (logged)."""

    name: str = "sgd"                     # "sgd" or "adamw"
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8                          # AdamW
    warmup_fraction: float = 0.0
    warmup_ratio: float = 0.0
    source: str = "the published EPS recipe (module/optimizer.py)"


@contextlib.contextmanager
def _no_bn_stat_update(module: nn.Module):
    """During checkpoint recomputation, undo the second update of the running statistics that
    training-mode BN layers make (the original forward already updated them). The recomputation
    itself runs unchanged - the same ops saving the same tensors, as checkpoint requires - and
    the buffers are put back afterwards."""
    bns = [m for m in module.modules()
           if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class Backbone(nn.Module):
    """Base class of the trunks. Subclasses set ``arch``, ``feature_channels`` (channels of
    ``conv6``), ``not_training`` (modules frozen when ``freeze_bn``) and implement
    ``forward_as_dict``; the heads set ``from_scratch_layers`` (fc8)."""

    arch: str = ""
    feature_channels: int = 0
    # Input pixels per feature-map cell (ResNet-38 / -101: 8; a ViT/16: 16; small: a build option)
    output_stride: int = 8
    # Whether build_network() should freeze BN when the caller does not say: True for backbones
    # meant to start from ImageNet weights (published behaviour), False for from-scratch ones
    # and for trunks without BatchNorm.
    default_freeze_bn: bool = True
    # Whether the backbone is meant to start from ImageNet weights (train.py asks for --weights).
    expects_pretrained: bool = True
    # Keys of the ImageNet classifier in this trunk's ImageNet files, dropped before loading
    # (network/weights.py read_pretrained also drops the CNNs' fc / linear1000 keys).
    imagenet_classifier_keys: Tuple[str, ...] = ()
    # Names of free parameters (not of a conv / linear / norm layer) without weight decay.
    no_weight_decay: Tuple[str, ...] = ()
    # How train.py optimizes this backbone's networks (default: the published SGD).
    optimizer_recipe: OptimizerRecipe = OptimizerRecipe()

    def __init__(self, *, freeze_bn: bool = True, checkpointing: bool = False):
        super().__init__()
        self.freeze_bn = bool(freeze_bn)
        self.checkpointing = bool(checkpointing)
        # Plain lists, as published: they hold references, not registered sub-modules.
        self.not_training: List[nn.Module] = []
        self.from_scratch_layers: List[nn.Module] = []

    # ----------------------------------------------------------------------------- options
    def options(self) -> Dict[str, int]:
        """Build options that change the layout (recorded in checkpoints; none for the ResNets)."""
        return {}

    @classmethod
    def options_from_state_dict(cls, sd) -> Optional[Dict[str, int]]:
        """The build options a checkpoint of this backbone was made with, from its shapes, for
        checkpoints that carry no record (see network/weights.py). None of the ResNets has any.
        None: the state dict cannot be this backbone's (its keys say so), so identification
        does not build it (a trunk that needs an optional package is then never imported)."""
        return {}

    # ----------------------------------------------------------------------------- features
    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map the heads use (``"conv6"`` of ``forward_as_dict``), (N,
        feature_channels, h, w) at ``output_stride``."""
        return self.forward_as_dict(x)["conv6"]

    def _run(self, block: nn.Module, *args):
        """Run one trunk block, through activation checkpointing when enabled and useful.
        use_reentrant=False is the supported mode (works when the input does not require grad,
        as behind the frozen stem); preserve_rng_state (default True) replays the same Dropout2d
        masks during recomputation, so outputs and gradients equal the plain forward's."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _no_bn_stat_update(block)))
        return block(*args)

    # ----------------------------------------------------------------------------- freezing
    def train(self, mode: bool = True):
        """nn.Module.train plus the published freezing (psa Net.train): the ``not_training``
        layers and every BN's affine parameters get requires_grad=False, and every BN stays in
        eval mode (ImageNet running statistics). With freeze_bn=False nothing is frozen and BN
        trains normally (for training from scratch)."""
        super().train(mode)
        if self.freeze_bn:
            for layer in self.not_training:
                for p in layer.parameters():
                    p.requires_grad_(False)
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        return self

    def frozen_parameter_names(self) -> List[str]:
        """Names of the parameters that never change in training (for logs and tests)."""
        if not self.freeze_bn:
            return []
        frozen = {id(p) for layer in self.not_training for p in layer.parameters()}
        for m in self.modules():
            if isinstance(m, _BatchNorm):
                frozen.update(id(p) for p in m.parameters(recurse=False))
        return [n for n, p in self.named_parameters() if id(p) in frozen]

    # ----------------------------------------------------------------------------- optimizer
    def get_parameter_groups(self) -> List[dict]:
        """The published four groups (psa/EPS network/resnet38_cls.py Net.get_parameter_groups, EPS
        module/optimizer.py get_optimizer), as named dicts::

            1x  (lr_mult 1,  weight_decay_mult 1): conv weights of the trunk
            2x  (lr_mult 2,  weight_decay_mult 0): conv biases of the trunk (none in ResNet-38)
            10x (lr_mult 10, weight_decay_mult 1): fc8.weight (from scratch)
            20x (lr_mult 20, weight_decay_mult 0): fc8 bias (none)

        As published, only Conv2d modules are visited and frozen convs (conv1a, b2*) are
        included: the published optimizer is built before train() sets requires_grad=False, so
        they sit in g0 with grad None and SGD skips them. BN parameters are never optimized when
        BN is frozen; with freeze_bn=False (training from scratch, not in the paper) BN weights
        join 1x and BN biases join 2x, following the weight/bias split of the published groups.
        Other trunks get the same split: linear layers (and other convolutions) like Conv2d,
        LayerNorm / GroupNorm like trainable BN, free parameters (position embeddings, class
        tokens) to 1x, or to a fifth group "1x_no_decay" (lr x1, no weight decay) when the
        backbone names them in ``no_weight_decay``. A backbone with another recipe (layer-wise
        lr decay) overrides this method (network/vit.py).
        The caller multiplies: lr = base_lr * lr_mult, weight_decay = wd * weight_decay_mult.
        """
        groups: Dict[str, list] = {name: [] for name, _, _ in PARAM_GROUPS + (NO_DECAY_GROUP,)}
        scratch = {id(m) for layer in self.from_scratch_layers for m in layer.modules()}
        for mod_name, m in self.named_modules():
            new = id(m) in scratch
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                groups["10x" if new else "1x"].append(m.weight)
                if m.bias is not None:
                    groups["20x" if new else "2x"].append(m.bias)
            elif isinstance(m, NORM_LAYERS):
                if isinstance(m, _BatchNorm) and self.freeze_bn:
                    continue
                if getattr(m, "weight", None) is not None:
                    groups["10x" if new else "1x"].append(m.weight)
                if getattr(m, "bias", None) is not None:
                    groups["20x" if new else "2x"].append(m.bias)
            else:  # free parameters of any other module (position embeddings, class tokens)
                for p_name, p in m.named_parameters(recurse=False):
                    full = f"{mod_name}.{p_name}" if mod_name else p_name
                    decay = full not in self.no_weight_decay
                    key = ("10x" if decay else "20x") if new else ("1x" if decay else NO_DECAY_GROUP[0])
                    groups[key].append(p)
        # Catch a layer type this grouping does not know (it would silently never train).
        grouped = {id(p) for ps in groups.values() for p in ps}
        bn_params = {id(p) for m in self.modules() if isinstance(m, _BatchNorm)
                     for p in m.parameters(recurse=False)}
        stray = [n for n, p in self.named_parameters() if id(p) not in grouped and id(p) not in bn_params]
        if stray:
            raise RuntimeError(f"parameters outside every optimizer group: {stray[:5]}; "
                               "extend get_parameter_groups for this layer type")
        return [dict(name=name, params=groups[name], lr_mult=lr_mult, weight_decay_mult=wd_mult)
                for name, lr_mult, wd_mult in PARAM_GROUPS + (NO_DECAY_GROUP,)
                if name != NO_DECAY_GROUP[0] or groups[name]]

    def extra_repr(self) -> str:
        return f"arch={self.arch}, freeze_bn={self.freeze_bn}, checkpointing={self.checkpointing}"
