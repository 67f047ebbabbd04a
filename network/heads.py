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
saliency, **hparams)``      sum is minimised (logged as ``loss_<term>``); ``extras=`` too when
                            the head has ``sample_extras``
``hparams``                 the method's hyper-parameters as data, ``{name: HParam(...)}``, with
                            their per-dataset defaults (the method's recipe); train.py makes each
                            one flag, fills it in and range-checks it. A subclass declares only
                            its own: the parents' are merged in (``__init_subclass__``)
``add_args(parser)``        optional: flags beyond the HParams' own (an alias, another
                            spelling); call ``super().add_args(parser)``, each flag is
                            declared once (``DeclareOnce``)
``check_hparams(**hp)``     a one-line problem across the values (beyond each HParam's range),
                            or None; gets every hyper-parameter, so ``super()`` needs no forwarding
``sample_extras(ctx)``      optional hook: what each training sample carries beyond image,
                            saliency and label (a second view, the index, a mask...); None = nothing
``around_step(step, it,     optional hook: runs the optimizer step (``step()``) and what goes
**hp)``                     around it (an EMA teacher, a memory update); None = ``step()`` alone
``classifier_key``          the state-dict key with ``out_channels(C)`` rows (default
                            ``fc8.weight``), from which ...
``num_classes_from_state_   ... C of an unrecorded checkpoint of this head is read (used to
dict(sd)``                  identify checkpoints by shape)
==========================  ==================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from network.base import Backbone
from network.losses import cls_loss, eps_loss

HEAD_PREFIX = "fc8."  # the classifier of both published heads; ImageNet files never have it


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a method, declared by its head. train.py turns it into the flag
    ``--<name with hyphens>`` (the underscore spelling is an alias), leaves it None on the
    command line so that the head's default for the run's dataset fills it in (``default_for``),
    and refuses a value outside ``[low, high]`` or ``choices`` before any compute. ``default``
    None with no per-dataset value makes the flag required for that dataset."""

    default: Any = None
    per_dataset: Mapping[str, Any] = field(default_factory=dict)  # dataset name -> default
    type: Callable = float
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[Sequence[Any]] = None

    def default_for(self, dataset: str) -> Any:
        """The method's value for a dataset of the registry; the plain default for any other
        (``--dataset custom``)."""
        return self.per_dataset.get(dataset, self.default)

    def describe_default(self) -> str:
        """``0.4``, or ``voc12 0.5, coco 0.9, other datasets 0.5``, for the help."""
        if all(v == self.default for v in self.per_dataset.values()):
            return "none (required)" if self.default is None else str(self.default)
        parts = [f"{d} {v}" for d, v in self.per_dataset.items()]
        if self.default is not None:
            parts.append(f"other datasets {self.default}")
        return ", ".join(parts)

    def problem(self, flag: str, value: Any) -> Optional[str]:
        """A one-line problem with a value, or None. NaN fails every comparison: refused too."""
        if self.choices is not None:
            return None if value in self.choices else f"{flag} must be one of {list(self.choices)}"
        if self.low is not None or self.high is not None:
            lo = -float("inf") if self.low is None else self.low
            hi = float("inf") if self.high is None else self.high
            if not lo <= value <= hi:
                where = (f"in [{self.low}, {self.high}]" if None not in (self.low, self.high)
                         else f">= {self.low}" if self.high is None else f"<= {self.high}")
                return f"{flag} must be {where}"
        return None


def flag_of(name: str) -> str:
    """The flag of a hyper-parameter: ``toy_weight`` -> ``--toy-weight``."""
    return "--" + name.replace("_", "-")


def add_hparam_flag(parser, name: str, hp: HParam, help: Optional[str] = None):
    """The flag of one HParam: ``--<name with hyphens>`` (the underscore spelling a hidden
    alias), default None so that the run's head fills in its value for the dataset."""
    import argparse

    from utils.cli import add_flag
    kind = (dict(action=argparse.BooleanOptionalAction) if hp.type is bool else
            dict(type=hp.type, choices=hp.choices))  # type=bool would take "False" as True
    return add_flag(parser, flag_of(name), dest=name, default=None,
                    help=help or f"{hp.help}. Default: {hp.describe_default()}", **kind)


class DeclareOnce:
    """A parser (or argument group) on which declaring a flag again with the same dest returns
    the first declaration (its new spellings, if any, become aliases of it): heads that inherit or share a hyper-parameter
    (a subclass of EpsHead calling ``super().add_args``) declare it once. A flag spelled like
    an existing one but with another dest is refused (two meanings for one flag)."""

    def __init__(self, parser):
        self._parser = parser

    def add_argument(self, *strings, **kwargs):
        taken = self._parser._option_string_actions
        first = next((taken[s] for s in strings if s in taken), None)
        if first is None:
            return self._parser.add_argument(*strings, **kwargs)
        longs = [s for s in strings if s.startswith("--")] or list(strings)
        dest = kwargs.get("dest") or longs[0].lstrip("-").replace("-", "_")
        if first.dest != dest:
            raise TypeError(f"flag {'/'.join(strings)} (dest {dest!r}) is already declared with "
                            f"dest {first.dest!r}; rename one of them")
        for s in strings:  # new spellings of the same flag become its (hidden) aliases
            if s not in taken:
                first.option_strings.append(s)
                taken[s] = first
        return first

    def __getattr__(self, name):
        return getattr(self._parser, name)


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
    # The method's hyper-parameters and their per-dataset defaults (its recipe). A subclass lists
    # only what it adds or changes; the parents' entries are merged in by __init_subclass__.
    hparams: Mapping[str, HParam] = {}
    # Two hooks for methods that need more than the published loop (docs/extending.md). None =
    # not used: train.py's loop is then the published one, bit for bit.
    #
    # sample_extras(ctx) -> {name: tensor or number}: a @staticmethod or @classmethod, run in the
    #   data-loading workers for every training sample (ctx: data.datasets.SampleContext, with
    #   the index, id, decoded image and saliency, label, hparams and ctx.view() for another
    #   augmented view). The batch's stacked dict reaches losses(..., extras=...).
    # around_step(self, step, iteration, **hparams): called instead of the optimizer step after
    #   backward; must call step() once (the optimizer step and the fp16 scaler update) and may do
    #   anything before or after it (an EMA teacher, a memory bank, a momentum encoder). State it
    #   keeps belongs in the model's state dict (register_buffer, or a sub-module whose
    #   parameters do not train): checkpoint_last.pth then saves it and --resume restores it
    #   exactly, and checkpoint_cls.pth carries it. ``iteration`` is the 0-based step.
    sample_extras: Optional[Callable[..., Dict[str, Any]]] = None
    around_step: Optional[Callable[..., None]] = None
    # The state-dict key whose first dimension is out_channels(C): how C is read from a checkpoint
    # that carries no record (released files). A head whose classifier is not fc8 names its own.
    classifier_key: str = HEAD_PREFIX + "weight"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("hparams")
        if own is not None and not (isinstance(own, Mapping)
                                    and all(isinstance(v, HParam) for v in own.values())):
            raise TypeError(f"{cls.__name__}.hparams must be a dict {{name: HParam(...)}} "
                            f"(network/heads.py, docs/extending.md), got {own!r}")
        hook = cls.__dict__.get("sample_extras")
        if hook is not None and not isinstance(hook, (staticmethod, classmethod)):
            raise TypeError(f"{cls.__name__}.sample_extras runs in the data-loading workers, "
                            f"without the model: declare it a @staticmethod or @classmethod")
        merged: Dict[str, HParam] = {}
        for base in reversed(cls.__mro__[1:]):
            merged.update(base.__dict__.get("hparams") or {})
        merged.update(own or {})
        cls.hparams = merged

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
    def add_args(cls, parser) -> None:
        """Declare this head's flags on train.py's parser. The default declares nothing beyond
        what train.py already made from ``hparams`` (one flag per HParam, inherited ones
        included). Override it to spell a flag your own way (aliases, metavar) or to add one,
        and call ``super().add_args(parser)``: train.py passes a parser on which a repeated
        declaration of a flag with the same dest is a no-op, so a subclass of EpsHead that
        calls super() gets --tau and --lam once. Values reach ``losses()`` and
        ``around_step()`` for the names in ``hparams``; give every flag they need an HParam
        (its per-dataset default and range check live there)."""
        for name, hp in cls.hparams.items():
            add_hparam_flag(parser, name, hp)

    @classmethod
    def check_hparams(cls, **hparams) -> Optional[str]:
        """A one-line problem across the hyper-parameter values, or None (checked before any
        compute, after each value's own HParam range). Receives every hyper-parameter of the
        head, inherited ones included."""
        return None

    @classmethod
    def resolve_hparams(cls, values: Mapping[str, Any], dataset: str) -> Dict[str, Any]:
        """The hyper-parameters of a run: the given values (None = not given) completed with
        the head's defaults for ``dataset``, then checked. Raises ValueError with one line."""
        out = {}
        for name, hp in cls.hparams.items():
            value = values.get(name)
            if value is None:
                value = hp.default_for(dataset)
            if value is None:
                raise ValueError(f"{flag_of(name)} is needed by the {cls.name} head (no default "
                                 f"for --dataset {dataset}); pass it")
            problem = hp.problem(flag_of(name), value)
            if problem:
                raise ValueError(problem)
            out[name] = value
        problem = cls.check_hparams(**out)
        if problem:
            raise ValueError(problem)
        return out


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
    # The EPS recipe (docs/reference.md 1.3): every published script passes --tau 0.4 (main.py's
    # own default is 0.5); voc12_eps.sh passes no --lam, so main.py's 0.5 applied, and
    # coco_eps.sh passes 0.9. Any other dataset (custom) gets the VOC values.
    hparams = {
        "tau": HParam(default=0.4, per_dataset={"voc12": 0.4, "coco": 0.4}, low=0, high=1,
                      help="EPS overlap-ratio threshold for foreground classes, in [0, 1] "
                           "(published scripts: 0.4; main.py default 0.5)"),
        "lam": HParam(default=0.5, per_dataset={"voc12": 0.5, "coco": 0.9}, low=0, high=1,
                      help="EPS weight of the foreground map in the predicted saliency, in "
                           "[0, 1] (published: VOC 0.5, COCO 0.9)"),
    }

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
