"""ViT-S/16 and ViT-B/16 backbones (``vit_small``, ``vit_base``), built on timm.

The whole backbone is this file plus one line in ``network/registry.py``; the heads use it
unchanged (``vit_small_cls``, ``vit_small_eps``, ``vit_base_eps``, ...). timm is an optional
dependency (``pip install -r requirements-timm.txt``), imported here only, when a ViT is built.

What the heads get: the patch tokens after the last block and the final LayerNorm, as a map
(N, embed_dim, ceil(H/16), ceil(W/16)): the class token is dropped, **output stride 16** (the
ResNets' is 8). The image is zero-padded to a multiple of 16 on the bottom and right (timm's
``dynamic_img_pad``) and the ImageNet position embedding (a 14 x 14 grid, from 224-pixel
training) is resampled to every input's grid (timm's ``dynamic_img_size``), so training crops
and the multi-scale inference views of any size work. There is no BatchNorm: nothing is frozen
(``default_freeze_bn`` False), ``--checkpointing`` checkpoints one transformer block at a time.

The state-dict keys are timm's own (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ..., ``norm.weight``), so a state dict of the timm model loads as
the ImageNet initialisation (``train.py --weights``; its ``head.*`` classifier is dropped).
timm's own loader writes such a file (it downloads; nothing here ever does)::

    python -m network.vit vit_small vit_small_imagenet.pth

The weights expect inputs normalised with mean = std = 0.5 (timm's ``augreg`` ImageNet weights,
the default tags below); the data pipeline normalises with the ImageNet mean / std, as published
(data/transforms.py), so the first step of ``forward_as_dict`` maps one to the other (two fixed
per-channel constants, not in the state dict).

The optimizer recipe (``optimizer_recipe``, ``get_parameter_groups``), where each value comes from:

* AdamW, betas (0.9, 0.999), eps 1e-8, lr 6e-5, weight decay 0.01, poly decay (power 0.9) after a
  linear warmup from 1e-6 x lr over 1,500 of 20,000 iterations (7.5 % of --max-iters here), the
  new classifier at 10x lr: ToCo, the ViT-B/16 CAM-classifier recipe for VOC and COCO (Ru et al.,
  CVPR 2023; github.com/rulixiang/ToCo scripts/dist_train_voc_seg_neg.py and
  utils/optimizer.py PolyWarmupAdamW);
* layer-wise lr decay 0.65 (block i of L gets lr x 0.65^(L - i), the embeddings 0.65^(L + 1),
  the final norm 1) and no weight decay on biases, norms, ``pos_embed`` and ``cls_token``: MAE's
  ViT-Base fine-tuning (github.com/facebookresearch/mae FINETUNE.md ``--layer_decay 0.65``,
  util/lr_decay.py param_groups_lrd, after BEiT). ToCo itself has no layer-wise decay; MAE gives
  no ViT-S value, so ViT-S uses ViT-B's.

No accuracy is claimed for these networks: nothing here was trained on VOC or COCO.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from network.base import Backbone, OptimizerRecipe
from utils.errors import UserError

REQUIREMENT = "requirements-timm.txt"
# The data pipeline's normalisation (data/transforms.py IMAGENET_MEAN / IMAGENET_STD, as
# published) and the one timm's augreg ViT weights were trained with.
PIPELINE_MEAN, PIPELINE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class TimmMissing(UserError):
    """timm is not installed."""


def _timm():
    try:
        import timm
    except ImportError:
        raise TimmMissing(f"the ViT backbones need timm: pip install -r {REQUIREMENT}") from None
    return timm


class ViT(Backbone):
    """A timm VisionTransformer (patch 16) as a trunk: patch tokens as a map, output stride 16."""

    timm_name: str = ""          # the timm model, with the tag of its ImageNet weights
    output_stride = 16
    default_freeze_bn = False    # no BatchNorm: nothing to freeze
    expects_pretrained = True    # train.py asks for --weights (or --weights none)
    imagenet_classifier_keys = ("head.weight", "head.bias")
    no_weight_decay = ("pos_embed", "cls_token")
    layer_decay = 0.65           # MAE FINETUNE.md, ViT-Base
    optimizer_recipe = OptimizerRecipe(
        name="adamw", lr=6e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
        warmup_fraction=1500 / 20000, warmup_ratio=1e-6,
        source="ToCo's ViT recipe with MAE's layer-wise lr decay 0.65 (network/vit.py)")

    def __init__(self, *, freeze_bn: bool = False, checkpointing: bool = False):
        super().__init__(freeze_bn=freeze_bn, checkpointing=checkpointing)
        vit = _timm().create_model(self.timm_name, pretrained=False, num_classes=0,
                                   dynamic_img_size=True, dynamic_img_pad=True)
        # timm's parts as this module's own attributes: the keys are timm's, without a prefix
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.patch_embed, self.pos_drop, self.norm_pre = vit.patch_embed, vit.pos_drop, vit.norm_pre
        self.blocks, self.norm = vit.blocks, vit.norm
        self.grid_size = tuple(vit.patch_embed.grid_size)  # the pos_embed's own grid, 14 x 14
        self.feature_channels = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        scale = torch.tensor([s / v for s, v in zip(PIPELINE_STD, VIT_STD)]).view(1, 3, 1, 1)
        shift = torch.tensor([(m - v) / sv for m, v, sv in zip(PIPELINE_MEAN, VIT_MEAN, VIT_STD)])
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def options_from_state_dict(cls, sd) -> Optional[Dict[str, int]]:
        # A ViT file has a class token; anything else is not this backbone's (and is never
        # built for a look: identifying a ResNet file does not need timm)
        return {} if "cls_token" in sd else None

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        from timm.layers import resample_abs_pos_embed

        x = x * self.input_scale + self.input_shift     # ImageNet mean/std -> the ViT's 0.5/0.5
        x = self.patch_embed(x)                         # (N, h, w, C), h = ceil(H / 16)
        n, h, w, c = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.grid_size,
                                     num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x.reshape(n, h * w, c)], dim=1) + pos
        x = self.norm_pre(self.pos_drop(x))
        for block in self.blocks:
            x = self._run(block, x)
        x = self.norm(x)
        patches = x[:, 1:].transpose(1, 2).reshape(n, c, h, w)  # class token dropped
        return {"conv6": patches}

    # ------------------------------------------------------------------------------ optimizer
    def _layer_id(self, name: str) -> int:
        """MAE util/lr_decay.py get_layer_id_for_vit: 0 for the embeddings, i + 1 for block i,
        depth + 1 for the final norm."""
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed.", "norm_pre.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return self.depth + 1
        raise RuntimeError(f"parameter {name} is outside every optimizer group: list its module "
                           f"in from_scratch_layers (a head's new layer) or extend "
                           f"{type(self).__name__}._layer_id")

    def get_parameter_groups(self) -> List[dict]:
        """Layer-wise lr decay (MAE / BEiT) on the trunk, 10x / 20x lr on the head's new layers
        (weights / biases, as the published groups and ToCo's classifier), no weight decay on
        1-D parameters, ``pos_embed`` and ``cls_token``. Named groups for utils/optim.py."""
        scratch = {id(p) for layer in self.from_scratch_layers for p in layer.parameters()}
        groups: Dict[str, dict] = {}
        for name, p in self.named_parameters():
            decay = p.ndim > 1 and name not in self.no_weight_decay
            if id(p) in scratch:
                key, lr_mult = ("10x" if decay else "20x"), (10 if decay else 20)
            else:
                layer = self._layer_id(name)
                key = f"layer{layer}" + ("" if decay else "_no_decay")
                lr_mult = self.layer_decay ** (self.depth + 1 - layer)
            group = groups.setdefault(key, dict(name=key, params=[], lr_mult=lr_mult,
                                                weight_decay_mult=1 if decay else 0))
            group["params"].append(p)
        return list(groups.values())


class ViTSmall(ViT):
    """ViT-S/16: 12 blocks, 384 channels, 6 heads (22 M parameters)."""

    arch = "vit_small"
    timm_name = "vit_small_patch16_224.augreg_in21k_ft_in1k"


class ViTBase(ViT):
    """ViT-B/16: 12 blocks, 768 channels, 12 heads (86 M parameters)."""

    arch = "vit_base"
    timm_name = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


VITS = {"vit_small": ViTSmall, "vit_base": ViTBase}


# ------------------------------------------------------------------------------------------------
# python -m network.vit: timm's ImageNet weights as a local file for train.py --weights
# ------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    from utils.cli import parent_parser

    p = parent_parser("ImageNet weights of a ViT backbone from timm's own loader, as a .pth")
    p.add_argument("backbone", type=str, choices=sorted(VITS),
                   help="vit_small (ViT-S/16) or vit_base (ViT-B/16)")
    p.add_argument("out", type=Path, help="the .pth to write (a state dict in timm's key names)")
    return p


def main(args) -> Path:
    from utils.io import torch_save

    if args.out.exists():
        raise UserError(f"{args.out} exists; choose another file or delete it")
    name = VITS[args.backbone].timm_name
    model = _timm().create_model(name, pretrained=True)  # timm downloads; needs the internet
    torch_save(model.state_dict(), args.out)
    print(f"{args.out}: {name} (timm), ImageNet classifier included (train.py drops it)")
    return args.out


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(get_args_parser, main, __doc__))
