"""The network registry: networks are a backbone x a head, composed here.

| backbone  | trunk                            | frozen by default (with ImageNet weights)  |
|-----------|----------------------------------|--------------------------------------------|
| resnet38  | ResNet-38d (psa), OS 8           | all BN; conv1a, b2, b2_1, b2_2             |
| resnet101 | torchvision ResNet-101, dilated  | all BN; conv1, bn1, layer1                 |
| small     | small conv-BN-ReLU (CPU demo)    | nothing (trained from scratch, BN trains)  |
| vit_small, vit_base | timm ViT-S/16, ViT-B/16, OS 16 | nothing (no BN); AdamW recipe (network/vit.py) |

| head | method                                   | fc8 rows | network/heads.py |
|------|------------------------------------------|----------|------------------|
| cls  | baseline CAM classifier                  | C        | ``ClsHead``      |
| eps  | EPS (saliency as pseudo-pixel supervision) | C + 1 (background last) | ``EpsHead`` |

Every combination is a network named ``<backbone>_<head>`` (``resnet38_eps`` is the paper's; a
head name has no ``_``, so ``vit_small_eps`` is the vit_small backbone with the eps head).
A new backbone is one file and one line in ``BACKBONES``; a new method is one file (head + loss)
and one line in ``HEADS`` (or ``register_backbone`` / ``register_head`` from outside the package,
``registered(...)`` for the length of a ``with`` block; docs/extending.md).
``num_classes`` is always C, the number of foreground classes (20 VOC, 80 COCO).

The composed class lists the head first and the backbone second, so the head's modules are
registered after the trunk's and the state-dict keys are the published flat names
(``conv1a.weight`` ... ``fc8.weight``) with no prefix.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Optional, Tuple, Type, Union

from torch import nn

from network.base import Backbone
from network.heads import ClsHead, EpsHead, Head
from network.resnet38d import ResNet38d
from network.resnet101 import ResNet101
from network.small import SmallNet
from network.vit import ViTBase, ViTSmall

BACKBONES: Dict[str, Type[Backbone]] = {
    "resnet38": ResNet38d,
    "resnet101": ResNet101,
    "small": SmallNet,
    "vit_small": ViTSmall, "vit_base": ViTBase,  # ViT-S/16, ViT-B/16 (timm, requirements-timm.txt)
}

HEADS: Dict[str, Type[Head]] = {
    "cls": ClsHead,
    "eps": EpsHead,
}

# name -> composed class; kept in step with BACKBONES x HEADS by _compose_all().
NETWORKS: Dict[str, Type[nn.Module]] = {}


def _compose(backbone: str, head: str) -> Type[nn.Module]:
    b, h = BACKBONES[backbone], HEADS[head]
    name = f"{backbone}_{head}"
    cls = type(f"{b.__name__}_{h.__name__}", (h, b), {
        "__module__": __name__, "__doc__": f"{name}: {h.__name__} on {b.__name__} (registry)",
        "network_name": name, "backbone_name": backbone})
    globals()[cls.__name__] = cls  # importable by name, so the class pickles like a written one
    return cls


def _compose_all() -> None:
    for b in BACKBONES:
        for h in HEADS:
            if f"{b}_{h}" not in NETWORKS:
                NETWORKS[f"{b}_{h}"] = _compose(b, h)


_compose_all()

# What the package itself registers; only what register_* added can be unregistered.
BUILTIN_HEADS, BUILTIN_BACKBONES = frozenset(HEADS), frozenset(BACKBONES)


def register_backbone(name: str, cls: Type[Backbone]) -> None:
    """Add a backbone (e.g. from a fork's own file); every head is composed with it. Its name may
    contain '_' (vit_small): a network's head is what follows its last '_'."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"{cls!r} is not a network.base.Backbone subclass")
    if not name or name in BACKBONES or name.startswith("_") or name.endswith("_"):
        raise ValueError(f"backbone name {name!r} is empty, taken, or starts or ends with '_'")
    BACKBONES[name] = cls
    _compose_all()


def register_head(cls: Type[Head]) -> None:
    """Add a method (a Head subclass with a unique ``name``); it is composed with every backbone."""
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise TypeError(f"{cls!r} is not a network.heads.Head subclass")
    if not cls.name or "_" in cls.name or cls.name in HEADS:
        raise ValueError(f"head name {cls.name!r} is empty, taken or contains '_'")
    HEADS[cls.name] = cls
    _compose_all()


def _drop_networks(backbone: Optional[str] = None, head: Optional[str] = None) -> None:
    for name in [n for n, c in NETWORKS.items()
                 if c.backbone_name == backbone or c.name == head]:
        cls = NETWORKS.pop(name)
        if globals().get(cls.__name__) is cls:  # the importable alias _compose made
            del globals()[cls.__name__]


def unregister_head(name: str) -> None:
    """Remove a head added by :func:`register_head`, with the networks composed from it (the
    built-in heads stay)."""
    if name not in HEADS or name in BUILTIN_HEADS:
        raise ValueError(f"{name!r} is not a head added by register_head")
    _drop_networks(head=name)
    del HEADS[name]


def unregister_backbone(name: str) -> None:
    """Remove a backbone added by :func:`register_backbone`, with the networks composed from it
    (the built-in backbones stay)."""
    if name not in BACKBONES or name in BUILTIN_BACKBONES:
        raise ValueError(f"{name!r} is not a backbone added by register_backbone")
    _drop_networks(backbone=name)
    del BACKBONES[name]


@contextlib.contextmanager
def registered(heads: Iterable[Type[Head]] = (),
               backbones: Optional[Dict[str, Type[Backbone]]] = None) -> Iterator[None]:
    """Heads and backbones registered for the duration of a ``with`` block, then removed (a
    test's or an experiment's methods must not outlive it: every entry point lists NETWORKS)."""
    added_heads, added_backbones = [], []
    try:
        for name, cls in (backbones or {}).items():
            register_backbone(name, cls)
            added_backbones.append(name)
        for cls in heads:
            register_head(cls)
            added_heads.append(cls.name)
        yield
    finally:
        for name in reversed(added_heads):
            unregister_head(name)
        for name in reversed(added_backbones):
            unregister_backbone(name)


def normalize_network_name(name: str) -> str:
    """Accept the published module-path spelling: "network.resnet38_eps" -> "resnet38_eps"."""
    key = name.strip()
    if key.startswith("network."):
        key = key[len("network."):]
    key = key.lower().replace("-", "_")
    if key not in NETWORKS:
        raise KeyError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    return key


def network_parts(name: str) -> Tuple[Type[Backbone], Type[Head]]:
    """(backbone class, head class) of a registered network name."""
    cls = NETWORKS[normalize_network_name(name)]
    return BACKBONES[cls.backbone_name], HEADS[cls.name]


def get_head(head: Union[str, Type[Head], nn.Module]) -> Type[Head]:
    """The head class of a head name ("eps"), a network name, a head class or a model (also an
    inference-only wrapper that carries ``head``)."""
    if isinstance(head, type) and issubclass(head, Head):
        return head
    if isinstance(head, nn.Module):
        found = getattr(head, "head", None)
        if isinstance(found, type) and issubclass(found, Head):
            return found
        for cls in type(head).__mro__:
            if cls in HEADS.values():
                return cls
        raise ValueError(f"{type(head).__name__} has no registered head")
    if isinstance(head, str):
        if head in HEADS:
            return HEADS[head]
        try:
            return network_parts(head)[1]
        except KeyError:
            pass
    raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")


def build_network(name: str, num_classes: int, *, freeze_bn: Optional[bool] = None,
                  checkpointing: bool = False, pretrained=None, **options) -> nn.Module:
    """Build a registered network for ``num_classes`` foreground classes.

    freeze_bn: None = the backbone's default: True for the ResNets (published: BN in eval mode
        with fixed affine parameters, early layers frozen), False for the small nets (trained
        from scratch). False trains every BN and freezes nothing.
    checkpointing: activation checkpointing of the trunk, one block at a time (less memory, about
        one extra forward pass of time; identical results).
    pretrained: ImageNet weights to initialise the trunk (MXNet .params for ResNet-38, or a .pth);
        fc8 stays new (asserted). For full checkpoints use network.weights.load_network.
    options: backbone build options (small nets: width, blocks, output_stride).
    """
    cls = NETWORKS[normalize_network_name(name)]
    if freeze_bn is None:
        freeze_bn = cls.default_freeze_bn
    model = cls(num_classes, freeze_bn=freeze_bn, checkpointing=checkpointing, **options)
    if pretrained:
        from network.weights import load_pretrained

        load_pretrained(model, pretrained)
    return model
