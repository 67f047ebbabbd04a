"""Loading weights: published checkpoints, project checkpoints and ImageNet initialisations.

* :func:`load_state_dict_file` reads a PyTorch file safely (``weights_only=True``), strips the
  DataParallel ``module.`` prefix and unwraps project checkpoints ``{"model": state_dict, ...}``.
* :func:`record_network` / :func:`network_record`: the network name, class count and build
  options that train.py records inside every state dict it writes.
* :func:`identify_checkpoint` says which registered network a state dict is: from its record,
  else by shape (every backbone x head built on the meta device and compared), with the
  dataset's class count and the network the user names. :func:`load_network` identifies, builds
  and loads strictly: the one way entry points read a trained classifier.
* :func:`load_weights` loads a full network strictly (fc8 included).
* :func:`load_pretrained` loads ImageNet weights (MXNet ``.params`` or ``.pth``) into the trunk
  and asserts that exactly the head (fc8) is left at its initialisation.

The published code loads with ``strict=False`` without looking at the result (EPS
module/model.py ``get_model``); here every load is checked, so a wrong prefix or file can never
silently train from scratch, and a checkpoint never runs as another head.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from network import mxnet_params
from network.errors import MissingWeightsFile, WeightsError
from network.registry import (BACKBONES, HEADS, NETWORKS, build_network, network_parts,
                              normalize_network_name)
from network.resnet38d import MXNET_CLASSIFIER_PREFIX, convert_mxnet_to_torch
from utils.torchfile import REFETCH_HINT, RESAVE_HINT, load_torch_file  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathOrStateDict = Union[str, Path, Mapping[str, torch.Tensor]]

# ImageNet classifiers to drop from pretrained files (torchvision fc; ademxapp linear1000).
IMAGENET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias", MXNET_CLASSIFIER_PREFIX + ".weight",
                            MXNET_CLASSIFIER_PREFIX + ".bias")
# Key of the network record in the root entry of a state dict's _metadata (record_network).
RECORD_KEY = "network_record"


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """DataParallel / DDP checkpoints prefix every key with "module."; the per-module _metadata
    (which carries the network record) is renamed with the keys."""
    out = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(
            ("" if k == "module" else k[len("module."):] if k.startswith("module.") else k, v)
            for k, v in meta.items())
    return out


def _unwrap(obj, source: str) -> StateDict:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # project checkpoints / common wrappers
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], source)
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if not bad:
            return _strip_module_prefix(obj)
        raise WeightsError(f"{source}: not a state_dict: the entries {bad[:5]} are not tensors "
                           f"(expected a state_dict or a checkpoint dict with a 'model' entry); "
                           f"{RESAVE_HINT}")
    raise WeightsError(f"{source}: holds a {type(obj).__name__}, not a state_dict; {RESAVE_HINT}")


def load_state_dict_file(path, mmap: bool = False) -> StateDict:
    """Read a PyTorch weights file into a plain state_dict on the CPU.

    Accepts plain state_dicts (with or without the ``module.`` prefix) and checkpoint dicts with a
    ``model`` (or ``state_dict``) entry. Uses ``weights_only=True``: no code from the file runs.
    Any file torch cannot read gives one WeightsError line naming the file, what it looks like
    (empty, text, another format, corrupt or truncated, pickled objects) and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsFile(f"{path}: no such weights file; check the path (README "
                                 f"'Downloads' lists where each weights file comes from)")
    if path.suffix == ".params":
        raise WeightsError(f"{path}: an MXNet .params file; pass it as ImageNet initialisation "
                           "(load_pretrained / --weights) or convert it with tools/convert_resnet38.py")
    return _unwrap(load_torch_file(path, mmap=mmap), str(path))


def _as_state_dict(source: PathOrStateDict) -> tuple:
    if isinstance(source, Mapping):
        return _unwrap(source, "<state_dict>"), "<state_dict>"
    return load_state_dict_file(source), str(source)


# ------------------------------------------------------------------------------------------------
# the network record: which network a checkpoint holds, stored inside the state dict
# ------------------------------------------------------------------------------------------------
def record_network(sd: StateDict, model: nn.Module) -> StateDict:
    """Attach the network's name, class count and build options to ``sd`` (returned).

    The record lives in the state dict's ``_metadata`` (the per-module dict PyTorch already
    saves for version numbers), so the file stays a plain state dict: the published infer.py
    loads it as it is, ``torch.load(weights_only=True)`` keeps the record, and a checkpoint
    whose fc8 rows fit two heads (C+1 rows: cls for C+1 classes or eps for C) is identified
    exactly."""
    meta = getattr(sd, "_metadata", None)
    if meta is None:
        sd = OrderedDict(sd)
        meta = sd._metadata = OrderedDict()
    root = dict(meta.get("", {}))
    root[RECORD_KEY] = dict(network=model.network_name, num_classes=int(model.num_classes),
                            options={k: int(v) for k, v in model.options().items()})
    meta[""] = root
    return sd


def network_record(sd: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """The record written by :func:`record_network`, or None (released and foreign files)."""
    rec = getattr(sd, "_metadata", {}).get("", {}).get(RECORD_KEY)
    return rec if isinstance(rec, dict) and isinstance(rec.get("network"), str) else None


# ------------------------------------------------------------------------------------------------
# identifying a checkpoint by its shapes
# ------------------------------------------------------------------------------------------------
class Candidate(NamedTuple):
    """A registered network that a state dict fits key for key and shape for shape."""
    network: str
    num_classes: int
    options: Dict[str, int]

    def __str__(self):
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.network} for {self.num_classes} classes{opts}"


def _reference(name: str, num_classes: int, options: Mapping[str, int]) -> Dict[str, tuple]:
    """Key -> shape of a registered network, built on the meta device (no memory, no init).
    The returned dict is shared: read it, do not change it."""
    return _built_reference(name, num_classes, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def _built_reference(name: str, num_classes: int, options: tuple) -> Dict[str, tuple]:
    # Cached: identifying one unrecorded checkpoint asks for every registered network several
    # times (candidates, then the message's description), ~1 s per ResNet build even on meta.
    with torch.device("meta"):
        model = build_network(name, num_classes, **dict(options))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fits(sd: Mapping[str, torch.Tensor], name: str, num_classes: int,
         options: Optional[Mapping[str, int]] = None) -> bool:
    """Whether ``sd`` loads strictly into the network (num_batches_tracked may be absent)."""
    try:
        ref = _reference(name, num_classes, options or {})
    except (TypeError, ValueError):
        return False
    for k, shape in ref.items():
        if k in sd:
            if tuple(sd[k].shape) != shape:
                return False
        elif not k.endswith("num_batches_tracked"):
            return False
    return all(k in ref for k in sd)


def checkpoint_candidates(sd: Mapping[str, torch.Tensor],
                          networks: Optional[List[str]] = None) -> List[Candidate]:
    """Every (network, C, options) that ``sd`` fits, trying each registered backbone x head
    (or only ``networks``) with the class count the head reads from its own parameters and the
    options the backbone reads from its own. By shape only: no key names are interpreted here."""
    out = []
    for name in sorted(NETWORKS if networks is None else networks):
        backbone, head = network_parts(name)
        c = head.num_classes_from_state_dict(sd)
        if c is None:
            continue
        options = backbone.options_from_state_dict(sd)
        if options is not None and fits(sd, name, c, options):
            out.append(Candidate(name, c, dict(options)))
    return out


def trunk_matches(sd: Mapping[str, torch.Tensor]) -> List[str]:
    """Backbones whose whole trunk is in ``sd`` with the right shapes (head keys ignored)."""
    out = []
    for name, cls in sorted(BACKBONES.items()):
        options = cls.options_from_state_dict(sd)
        if options is None:  # its keys say it is not this backbone's: not built
            continue
        try:
            with torch.device("meta"):
                ref = cls(**options).state_dict()
        except (TypeError, ValueError):
            continue
        if all(k in sd and tuple(sd[k].shape) == tuple(v.shape)
               for k, v in ref.items() if not k.endswith("num_batches_tracked")):
            out.append(name)
    return out


def beyond_trunk(sd: Mapping[str, torch.Tensor], backbone: str) -> List[str]:
    """The keys of ``sd`` that the backbone's trunk does not have: its head, whatever its name
    (an ImageNet classifier is not a head)."""
    cls = BACKBONES[backbone]
    with torch.device("meta"):
        trunk = cls(**(cls.options_from_state_dict(sd) or {})).state_dict()
    return [k for k in sd if k not in trunk and k not in imagenet_classifier_keys()]


def _classifier_rows(sd: Mapping[str, torch.Tensor]) -> str:
    """The " (fc8 has 21 rows)" of messages, for each registered head's classifier in ``sd``."""
    keys = sorted({h.classifier_key for h in HEADS.values()
                   if h.classifier_key in sd and sd[h.classifier_key].dim()})
    return "".join(f" ({k.rsplit('.', 1)[0]} has {int(sd[k].shape[0])} rows)" for k in keys)


def describe_checkpoint(sd: Mapping[str, torch.Tensor]) -> str:
    """One phrase saying what a state dict is, for messages, e.g. "a recorded resnet38_eps
    checkpoint for 20 classes" or "fits resnet38_cls for 21 classes or resnet38_eps for 20
    classes (fc8 has 21 rows)"."""
    rec = network_record(sd)
    if rec is not None:
        return f"a {rec['network']} checkpoint for {rec['num_classes']} classes (recorded in the file)"
    cands = checkpoint_candidates(sd)
    rows = _classifier_rows(sd)
    if cands:
        return "fits " + " or ".join(str(c) for c in cands) + rows
    trunks = trunk_matches(sd)
    if trunks and not beyond_trunk(sd, trunks[0]):
        return f"a {' or '.join(trunks)} trunk without a classifier head (ImageNet weights?)"
    if trunks:
        return f"a {' or '.join(trunks)} trunk with a head that fits no registered head{rows}"
    return f"fits no registered network ({len(sd)} tensors, e.g. {_short(list(sd), 3)})"


def identify_checkpoint(sd: Mapping[str, torch.Tensor], num_classes: int,
                        network: Optional[str] = None, *, source: str = "<state_dict>",
                        ambiguous_ok: bool = True) -> Candidate:
    """Which registered network ``sd`` is, for a dataset with ``num_classes`` classes.

    1. A record written by train.py (:func:`record_network`) decides exactly; a --network or a
       class count that contradicts it is an error.
    2. Otherwise the shapes decide, with the dataset's class count and the network the user
       names (``network``): exactly one fitting candidate is required. A file without a record
       whose shapes also fit another head for another class count (C+1 fc8 rows: cls for C+1
       or eps for C) is an error when ``ambiguous_ok`` is False (the caller passes False for
       datasets whose class count is the user's own), unless ``network`` names it.
    Raises WeightsError with the fix; never falls back to another head."""
    try:
        want = normalize_network_name(network) if network else None
    except KeyError:
        raise WeightsError(f"unknown --network {network!r}; choose one of "
                           f"{sorted(NETWORKS)}") from None
    rec = network_record(sd)
    if rec is not None:
        name, c, options = rec["network"], int(rec["num_classes"]), dict(rec.get("options", {}))
        if name not in NETWORKS:
            raise WeightsError(f"{source}: holds a {name} network, which is not registered here "
                               f"(a fork's method? register it first); known: {sorted(NETWORKS)}")
        if want and want != name:
            raise WeightsError(f"{source}: is a {name} checkpoint (recorded in the file), not "
                               f"{want}; drop --network or pass the right checkpoint")
        if c != num_classes:
            raise WeightsError(f"{source}: is a {name} checkpoint for {c} classes (recorded in "
                               f"the file), but the dataset has {num_classes}; pass the dataset "
                               f"it was trained on (--dataset / --metadata-dir)")
        if not fits(sd, name, c, options):
            raise WeightsError(f"{source}: its tensors do not match its own record ({name} for "
                               f"{c} classes); the file was edited or is damaged")
        return Candidate(name, c, options)
    # A named network is the only one tried (building every registered one on the meta device
    # imports their libraries: torchvision for ResNet-101, about 1 s)
    cands = checkpoint_candidates(sd, [want] if want else None)
    mine = [x for x in cands if x.num_classes == num_classes]
    if len(mine) == 1:
        others = ([] if want else
                  [x for x in checkpoint_candidates(sd) if x.num_classes != num_classes])
        if others:
            if not ambiguous_ok:
                raise WeightsError(
                    f"{source}: has no network record and its shapes fit {mine[0]} or "
                    f"{' or '.join(map(str, others))}; pass --network to say which (train.py "
                    f"records it in the checkpoints it writes)")
            logger.info("%s: no network record; identified by its shapes as %s (the dataset's "
                        "class count)", source, mine[0])
        return mine[0]
    if len(mine) > 1:
        raise WeightsError(f"{source}: fits several networks for {num_classes} classes "
                           f"({', '.join(map(str, mine))}); pass --network")
    what = describe_checkpoint(sd)
    if want:
        raise WeightsError(f"{source}: does not fit {want} for {num_classes} classes (the file "
                           f"{what}); drop --network to identify it, or pass the matching "
                           f"checkpoint or dataset")
    if cands:
        raise WeightsError(f"{source}: {what}, but the dataset has {num_classes} classes; pass "
                           f"the dataset it was trained on or a checkpoint trained on this one")
    if any(k.startswith("base.aspp.") for k in sd):  # network/deeplab.py's MSC layout
        raise WeightsError(f"{source}: a DeepLab-v2 segmentation checkpoint (train_seg.py), not "
                           f"a classifier; run it with infer_seg.py, and pass infer.py a "
                           f"classifier (train.py's checkpoint_cls.pth or a released one)")
    raise WeightsError(f"{source}: {what}; pass a trained classifier (train.py's "
                       f"checkpoint_cls.pth or a released one)")


def load_network(source: PathOrStateDict, num_classes: int, network: Optional[str] = None,
                 *, ambiguous_ok: bool = True, **build_kwargs) -> Tuple[nn.Module, Candidate]:
    """Identify a full checkpoint (:func:`identify_checkpoint`), build that network and load it
    strictly. The one way train.py, infer.py and the released-checkpoint script read one."""
    sd, src = _as_state_dict(source)
    found = identify_checkpoint(sd, num_classes, network, source=src, ambiguous_ok=ambiguous_ok)
    model = build_for_loading(found.network, found.num_classes, **{**found.options, **build_kwargs})
    load_weights(model, sd, source=src)
    return model, found


def build_for_loading(name: str, num_classes: int, **kwargs) -> nn.Module:
    """The network without the random initialisation that a strict load overwrites entirely
    (ResNet-38: about 0.8 s of CPU for nothing): built on the meta device, then given
    uninitialised CPU memory, with BN's num_batches_tracked at 0 as in a fresh build (some
    checkpoints lack it; :func:`_fill_num_batches_tracked`). A network holding state that a load
    does not restore (non-persistent buffers, tensor attributes) is built normally."""
    if kwargs.get("pretrained"):
        return build_network(name, num_classes, **kwargs)
    try:
        with torch.device("meta"):
            model = build_network(name, num_classes, **kwargs)
    except Exception:  # noqa: BLE001 - e.g. ``.item()`` in __init__ (stochastic depth rates):
        # meta tensors have no values; such a network is simply built the ordinary way
        return build_network(name, num_classes, **kwargs)
    if not _restorable_by_load(model):
        return build_network(name, num_classes, **kwargs)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for key, buf in model.named_buffers():
            if key.endswith("num_batches_tracked"):
                buf.zero_()
    return model


def _holds_tensor(value, depth: int = 2) -> bool:
    """A tensor, or a list/tuple/dict holding one (``depth`` levels down)."""
    if isinstance(value, torch.Tensor):
        return True
    if depth > 0 and isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, depth - 1) for v in value)
    if depth > 0 and isinstance(value, dict):
        return any(_holds_tensor(v, depth - 1) for v in value.values())
    return False


def _restorable_by_load(model: nn.Module) -> bool:
    """Whether a strict load_state_dict sets every value of ``model`` once it has memory:
    no non-persistent buffers and no tensors kept as plain attributes (a load never writes them),
    and no tied parameters or buffers (``to_empty`` gives each slot its own tensor, which would
    untie them)."""
    for m in model.modules():
        if m._non_persistent_buffers_set or any(_holds_tensor(v) for k, v in vars(m).items()
                                                if k not in ("_parameters", "_buffers", "_modules")):
            return False
    tied = (len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters()))
            or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.buffers())))
    return not tied


def _model_summary(model: nn.Module) -> str:
    name = getattr(model, "network_name", type(model).__name__)
    c = getattr(model, "num_classes", None)
    return f"{name} ({c} classes)" if c is not None else name


# ------------------------------------------------------------------------------------------------
# checking and loading
# ------------------------------------------------------------------------------------------------
def _fill_num_batches_tracked(model: nn.Module, sd: StateDict) -> StateDict:
    """Older checkpoints (and converted MXNet weights) lack BN's num_batches_tracked. It is only a
    counter (0 in the released checkpoints, since BN never trains), so take the model's own."""
    sd = OrderedDict(sd)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v.clone()
    return sd


def _compare(model: nn.Module, sd: Mapping[str, torch.Tensor]):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and sd[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def _short(items, n: int = 6) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _mismatch_message(source: str, model: nn.Module, sd, missing, unexpected, mismatched,
                      what: str) -> str:
    lines = [f"{source}: does not fit {_model_summary(model)} ({what}). The file: "
             f"{describe_checkpoint(sd)}."]
    c = getattr(model, "num_classes", None)
    if c is not None:
        right = [x for x in checkpoint_candidates(sd) if x.num_classes == c]
        if right:
            lines.append(f"For {c} classes use {' or '.join(x.network for x in right)}.")
    if mismatched:
        lines.append("Shape mismatches (key, file, network): " + _short(mismatched, 4) + ".")
    if missing:
        lines.append("Missing from the file: " + _short(missing) + ".")
    if unexpected:
        lines.append("Not in the network: " + _short(unexpected) + ".")
    return " ".join(lines)


def load_weights(model: nn.Module, weights: PathOrStateDict, *, strict: bool = True,
                 source: Optional[str] = None) -> dict:
    """Load a full network (trunk and fc8) from a checkpoint path or a state_dict.

    Strict by default: every key and shape must match (num_batches_tracked may be absent). On a
    mismatch, WeightsError says what the file is and which network fits it. With strict=False the
    missing/unexpected keys are logged and returned, never silently ignored.
    Returns {"missing": [...], "unexpected": [...]}."""
    raw, name = _as_state_dict(weights)
    name = source or name
    sd = _fill_num_batches_tracked(model, raw)
    missing, unexpected, mismatched = _compare(model, sd)
    if mismatched or (strict and (missing or unexpected)):
        raise WeightsError(_mismatch_message(name, model, raw, missing, unexpected, mismatched,
                                             "strict loading"))
    model.load_state_dict(sd, strict=strict)
    if missing or unexpected:
        logger.warning("%s: non-strict load into %s; missing %s; unexpected %s", name,
                       _model_summary(model), _short(missing), _short(unexpected))
    logger.info("loaded %s into %s", name, _model_summary(model))
    return dict(missing=missing, unexpected=unexpected)


def head_keys(model: nn.Module) -> List[str]:
    """The state-dict keys of a network that its head adds to the trunk (fc8 for both published
    heads): what an ImageNet initialisation leaves new."""
    with torch.device("meta"):
        trunk = BACKBONES[model.backbone_name](**model.options()).state_dict()
    return [k for k in model.state_dict() if k not in trunk]


def imagenet_classifier_keys() -> frozenset:
    """The ImageNet classifier keys of every registered backbone's ImageNet files (the CNNs' fc /
    linear1000, and what each backbone declares, e.g. a timm ViT's head)."""
    return frozenset(IMAGENET_CLASSIFIER_KEYS).union(
        *(b.imagenet_classifier_keys for b in BACKBONES.values()))


def read_pretrained(path, shapes_only: bool = False) -> StateDict:
    """ImageNet weights as a trunk state_dict: an MXNet ``.params`` file (ResNet-38, renamed as
    psa's resnet38d.convert_mxnet_to_torch does) or a PyTorch file, with any ImageNet classifier
    removed. ``shapes_only``: tensors on the meta device (MXNet: a header pass over the file;
    PyTorch: memory-mapped), for checks that read no weight values."""
    path = Path(path)
    if path.suffix == ".params" and shapes_only:
        from network.resnet38d import mxnet_name_to_torch
        sd = {}
        for name, shape in mxnet_params.read_shapes(path).items():
            key = mxnet_name_to_torch(name)
            if key is not None:
                sd[key] = torch.empty(shape, device="meta")
    elif path.suffix == ".params":
        sd = convert_mxnet_to_torch(mxnet_params.load_params(path))
    else:
        sd = load_state_dict_file(path, mmap=shapes_only)
    drop = imagenet_classifier_keys()
    dropped = [k for k in sd if k in drop]
    for k in dropped:
        del sd[k]
    if dropped:
        logger.info("%s: dropped the ImageNet classifier %s", path, dropped)
    return sd


def load_pretrained(model: nn.Module, path, sd: Optional[StateDict] = None) -> dict:
    """Initialise the trunk from ImageNet weights (``.params`` or ``.pth``); the head keeps its
    initialisation (xavier fc8). Asserts that the keys left out are exactly the head's and that
    the file has nothing the network lacks: a non-strict load whose result is checked, never a
    silent one (the published module/model.py loads with strict=False and never looks).
    ``sd``: the file already read by :func:`read_pretrained`.
    Returns {"missing": [...head keys...], "loaded": number of tensors loaded}."""
    path = Path(path)
    sd = read_pretrained(path) if sd is None else sd
    head = head_keys(model)
    if any(k in head for k in sd):
        raise WeightsError(f"{path}: has a trained head ({describe_checkpoint(sd)}), so it is "
                           "not an ImageNet initialisation; pass it to infer.py --weights, or to "
                           "train.py --weights to fine-tune a trained classifier")
    raw, sd = sd, _fill_num_batches_tracked(model, sd)
    missing, unexpected, mismatched = _compare(model, sd)
    if mismatched or unexpected or set(missing) != set(head):
        raise WeightsError(_mismatch_message(str(path), model, raw, [k for k in missing if k not in head],
                                             unexpected, mismatched, "ImageNet initialisation leaves "
                                             "exactly the head new"))
    result = model.load_state_dict(sd, strict=False)
    # The same check on PyTorch's own report (guards against _compare and PyTorch disagreeing).
    assert set(result.missing_keys) == set(head) and not result.unexpected_keys, result
    logger.info("ImageNet init from %s: %d tensors loaded, new: %s", path, len(sd), head)
    return dict(missing=list(result.missing_keys), loaded=len(sd))


def _initial_kind(model: nn.Module, path: Path, sd: StateDict) -> str:
    """"imagenet" or "checkpoint" for train.py --weights, or the WeightsError the loading would
    raise (shapes only: works on a meta-device model; the checks of load_pretrained and of the
    checkpoint branch of load_initial_weights)."""
    head = set(head_keys(model))
    if not any(k in head for k in sd):
        missing, unexpected, mismatched = _compare(model, _fill_num_batches_tracked(model, sd))
        if mismatched or unexpected or set(missing) != head:
            raise WeightsError(_mismatch_message(str(path), model, sd, [k for k in missing if k not in head],
                                                 unexpected, mismatched, "ImageNet initialisation "
                                                 "leaves exactly the head new"))
        return "imagenet"
    if not fits(sd, model.network_name, model.num_classes, model.options()):
        raise WeightsError(
            f"--weights {path}: {describe_checkpoint(sd)}; but {model.network_name} for the "
            f"dataset's {model.num_classes} classes needs other shapes. Pass the ImageNet weights "
            f"(README 'Downloads'), or a checkpoint trained for this network and dataset")
    return "checkpoint"


def check_initial_weights(path, network: str, num_classes: int, **build_kwargs) -> str:
    """What load_initial_weights would do with ``path``, in seconds and without any weight
    values: the file's header (MXNet) or memory-mapped keys and shapes (PyTorch) against the
    network built on the meta device. Raises the WeightsError the run would meet; returns
    "imagenet" or "checkpoint" (tools/preflight.py)."""
    path = Path(path)
    with torch.device("meta"):
        model = build_network(network, num_classes, **build_kwargs)
    return _initial_kind(model, path, read_pretrained(path, shapes_only=True))


def load_initial_weights(model: nn.Module, path) -> str:
    """train.py --weights: ImageNet weights for the trunk (the published start; the head stays
    new), or a trained checkpoint of this very network and class count (fine-tuning, loaded
    strictly). Returns "imagenet" or "checkpoint"."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--weights {path}: file not found; download the ImageNet weights "
                           f"(README 'Downloads') or pass --weights none to train from scratch")
    sd = read_pretrained(path)
    head = set(head_keys(model))  # once: it builds the trunk (a generator would rebuild per key)
    if not any(k in head for k in sd):
        load_pretrained(model, path, sd)
        return "imagenet"
    if not fits(sd, model.network_name, model.num_classes, model.options()):
        raise WeightsError(
            f"--weights {path}: {describe_checkpoint(sd)}; but {model.network_name} for the "
            f"dataset's {model.num_classes} classes needs other shapes. Pass the ImageNet weights "
            f"(README 'Downloads'), or a checkpoint trained for this network and dataset")
    load_weights(model, sd, source=str(path))
    return "checkpoint"
