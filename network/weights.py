"""Loading weights: published checkpoints, project checkpoints and ImageNet initialisations.

* :func:`load_state_dict_file` reads a PyTorch file safely (``weights_only=True``), strips the
  DataParallel ``module.`` prefix and unwraps project checkpoints ``{"model": state_dict, ...}``.
* :func:`describe_checkpoint` says what a state_dict is (arch, cls/eps head, class count), so
  errors can name the right network and entry points can infer it.
* :func:`load_weights` loads a full network strictly (fc8 included).
* :func:`load_pretrained` loads ImageNet weights (MXNet ``.params`` or ``.pth``) into the trunk
  and asserts that exactly the head (fc8) is left at its initialisation.

The published code loads with ``strict=False`` without looking at the result (reference.md 1.6);
here every load is checked, so a wrong prefix or file can never silently train from scratch.
"""
from __future__ import annotations

import logging
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from network import mxnet_params
from network.errors import WeightsError
from network.registry import build_network, normalize_network_name
from network.resnet38d import MXNET_CLASSIFIER_PREFIX, convert_mxnet_to_torch
from utils.io import describe_file_start, read_file_start

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathOrStateDict = Union[str, Path, Mapping[str, torch.Tensor]]

# Class counts of the datasets the registry knows (foreground only): an fc8 with C rows is a
# baseline classifier for C classes, one with C+1 rows an EPS classifier.
KNOWN_NUM_CLASSES = (20, 80)
# ImageNet classifiers to drop from pretrained files (torchvision fc; ademxapp linear1000).
IMAGENET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias", MXNET_CLASSIFIER_PREFIX + ".weight",
                            MXNET_CLASSIFIER_PREFIX + ".bias")
HEAD_PREFIX = "fc8."


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    # DataParallel / DDP checkpoints prefix every key with "module."
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())


# The fix for a file that holds more than tensors: save the weights alone, from the session (or
# script) that built the model, which is where the objects' code is available and trusted anyway.
RESAVE_HINT = "re-save only the weights where the model was built: torch.save(model.state_dict(), PATH)"
REFETCH_HINT = "download or copy it again"


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


def _torch_reason(e: Exception) -> str:
    """The gist of torch.load's error, one line, without torch's advice: that advice is to load
    with weights_only=False, which runs the file's code, and this project never does."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.split(". ")[0][:100]
    if "weights_only" in line:
        line = ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _zip_without_pickle(path: Path) -> bool:
    """A readable zip archive that has no data.pkl (e.g. a numpy .npz): not a PyTorch file."""
    try:
        with zipfile.ZipFile(path) as z:
            return not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _unreadable_message(path: Path, head: bytes, e: Exception) -> str:
    """One line saying why torch.load could not read ``path``, and what to do about it."""
    kind, words = describe_file_start(head)
    size = path.stat().st_size
    if kind in ("zip", "torch-legacy", "pickle") and "Unsupported global" in str(e):
        # weights_only loading met a class or function: running it could run any code.
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        return (f"{path}: not a plain weights file: it holds Python objects other than tensors{what}, "
                f"which are refused for safety (no code from a weights file is run); {RESAVE_HINT}")
    if kind == "zip" and _zip_without_pickle(path):
        return (f"{path}: not a PyTorch weights file (a zip archive without data.pkl, e.g. a numpy "
                f".npz); pass a .pth written by torch.save")
    if kind in ("zip", "torch-legacy"):
        return (f"{path}: corrupt or truncated PyTorch file ({size} bytes; {_torch_reason(e)}) - "
                f"{REFETCH_HINT}")
    if kind == "binary":
        return (f"{path}: not a readable PyTorch weights file (it starts with {words}; PyTorch files "
                f"start with a zip or pickle header): corrupt or truncated - {REFETCH_HINT}")
    return (f"{path}: not a PyTorch weights file (it starts with {words}); pass the .pth written by "
            f"torch.save, or download it again if a download saved something else in its place")


def load_state_dict_file(path) -> StateDict:
    """Read a PyTorch weights file into a plain state_dict on the CPU.

    Accepts plain state_dicts (with or without the ``module.`` prefix) and checkpoint dicts with a
    ``model`` (or ``state_dict``) entry. Uses ``weights_only=True``: no code from the file runs.
    Any file torch cannot read gives one WeightsError line naming the file, what it looks like
    (empty, text, another format, corrupt or truncated, pickled objects) and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".params":
        raise WeightsError(f"{path}: an MXNet .params file; pass it as ImageNet initialisation "
                           "(load_pretrained / --weights) or convert it with tools/convert_resnet38.py")
    try:
        head = read_file_start(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
    kind, _ = describe_file_start(head)
    if kind == "empty":
        raise WeightsError(f"{path}: empty (0 bytes): corrupt or truncated - {REFETCH_HINT}")
    if kind == "mxnet":
        raise WeightsError(f"{path}: an MXNet .params file under another name; rename it to .params "
                           "and pass it as ImageNet initialisation, or convert it with "
                           "tools/convert_resnet38.py")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, IndexError, EOFError, ... here
        # e.g. a text file: the legacy loader reads its first byte as a pickle opcode and raises
        # KeyError(101) for "e"; a cut zip raises RuntimeError; a cut legacy file IndexError.
        raise WeightsError(_unreadable_message(path, head, e)) from None
    return _unwrap(obj, str(path))


def _as_state_dict(source: PathOrStateDict) -> tuple:
    if isinstance(source, Mapping):
        return _unwrap(source, "<state_dict>"), "<state_dict>"
    return load_state_dict_file(source), str(source)


# ------------------------------------------------------------------------------------------------
# describing
# ------------------------------------------------------------------------------------------------
def _infer_arch(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if "conv1a.weight" in sd and any(k.startswith("b7.") for k in sd):
        return "resnet38"
    if "layer4.0.conv1.weight" in sd:
        n3 = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
        return {23: "resnet101", 6: "resnet50", 36: "resnet152"}.get(n3, f"resnet ({n3} blocks in layer3)")
    if "stem.conv.weight" in sd:
        return "small"
    return None


def describe_checkpoint(sd: Mapping[str, torch.Tensor], num_classes: Optional[int] = None) -> dict:
    """What a state_dict is: {"arch", "head_type", "num_classes", "fc8_outputs", "network",
    "summary"}. The head type comes from the number of fc8 rows: C for a baseline (cls)
    classifier, C+1 for EPS, with C = ``num_classes`` when the row count fits it, else one of the
    known datasets' counts (20 VOC, 80 COCO); if neither decides, head_type is None.
    ``network`` is the registry name when known.

    Example summary: "fc8 has 21 outputs: an EPS checkpoint for 20 classes; use resnet38_eps".
    """
    arch = _infer_arch(sd)
    fc8 = sd.get("fc8.weight")
    head_type, classes, outputs = None, None, None
    if fc8 is None:
        if any(k in sd for k in IMAGENET_CLASSIFIER_KEYS):
            summary = "an ImageNet classification checkpoint (no fc8)"
        else:
            summary = "a trunk without a classifier head (no fc8), e.g. converted ImageNet weights"
    else:
        outputs = int(fc8.shape[0])
        if num_classes is not None and outputs in (num_classes, num_classes + 1):
            head_type = "cls" if outputs == num_classes else "eps"
        elif outputs in KNOWN_NUM_CLASSES:
            head_type = "cls"
        elif outputs - 1 in KNOWN_NUM_CLASSES:
            head_type = "eps"
        if head_type == "cls":
            classes = outputs
            summary = f"fc8 has {outputs} outputs: a baseline (cls) checkpoint for {classes} classes"
        elif head_type == "eps":
            classes = outputs - 1
            summary = f"fc8 has {outputs} outputs: an EPS checkpoint for {classes} classes"
        else:
            summary = (f"fc8 has {outputs} outputs: a cls checkpoint for {outputs} classes or an EPS "
                       f"checkpoint for {outputs - 1} classes")
    network = f"{arch}_{head_type}" if arch in ("resnet38", "resnet101", "small") and head_type else None
    if network:
        summary += f"; use {network}"
    return dict(arch=arch, head_type=head_type, num_classes=classes, fc8_outputs=outputs,
                network=network, summary=summary)


def _model_name(model: nn.Module) -> str:
    arch = getattr(model, "arch", type(model).__name__)
    head = getattr(model, "head_type", None)
    return f"{arch}_{head}" if head else arch


def _model_summary(model: nn.Module) -> str:
    c = getattr(model, "num_classes", None)
    return f"{_model_name(model)} ({c} classes)" if c is not None else _model_name(model)


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
    desc = describe_checkpoint(sd, getattr(model, "num_classes", None))
    lines = [f"{source}: does not fit {_model_summary(model)} ({what}). The file: {desc['summary']}."]
    if desc["arch"] and getattr(model, "arch", None) and desc["arch"] != model.arch:
        lines.append(f"It is a {desc['arch']} checkpoint, the network is {model.arch}.")
    if mismatched:
        lines.append("Shape mismatches (key, file, network): " + _short(mismatched, 4))
    if missing:
        lines.append("Missing from the file: " + _short(missing))
    if unexpected:
        lines.append("Not in the network: " + _short(unexpected))
    return "\n".join(lines)


def load_weights(model: nn.Module, source: PathOrStateDict, *, strict: bool = True) -> dict:
    """Load a full network (trunk and fc8) from a checkpoint path or a state_dict.

    Strict by default: every key and shape must match (num_batches_tracked may be absent). On a
    mismatch, WeightsError names what the checkpoint is and which network to use instead. With
    strict=False the missing/unexpected keys are logged and returned, never silently ignored.
    Returns {"missing": [...], "unexpected": [...], "description": describe_checkpoint(...)}.
    """
    sd, name = _as_state_dict(source)
    sd = _fill_num_batches_tracked(model, sd)
    missing, unexpected, mismatched = _compare(model, sd)
    if mismatched or (strict and (missing or unexpected)):
        raise WeightsError(_mismatch_message(name, model, sd, missing, unexpected, mismatched,
                                             "strict loading"))
    model.load_state_dict(sd, strict=strict)
    if missing or unexpected:
        logger.warning("%s: non-strict load into %s; missing %s; unexpected %s", name,
                       _model_summary(model), _short(missing), _short(unexpected))
    desc = describe_checkpoint(sd)
    logger.info("loaded %s into %s (%s)", name, _model_summary(model), desc["summary"])
    return dict(missing=missing, unexpected=unexpected, description=desc)


def small_net_kwargs(sd: StateDict) -> Dict[str, int]:
    """Build options (width, blocks) of a small-net state dict, read from its shapes; empty for
    other networks. output_stride is not stored in weights (the small nets default to 8)."""
    if "stem.conv.weight" not in sd:
        return {}
    units = {k.split(".")[1] for k in sd if k.startswith("stage1.")}
    return dict(width=int(sd["stem.conv.weight"].shape[0]), blocks=max(0, len(units) - 1))


def build_network_from_checkpoint(source: PathOrStateDict, name: Optional[str] = None,
                                  num_classes: Optional[int] = None, **kwargs):
    """Build the registry network that fits a full checkpoint and load it strictly.

    ``name`` / ``num_classes`` override what the checkpoint says (a mismatch then raises the usual
    WeightsError naming the right network). For the small nets width and blocks are read from the
    weights; output_stride is not stored in weights, so pass it in kwargs when it is not 8.
    Returns (model, describe_checkpoint(...)).
    """
    sd, src = _as_state_dict(source)
    desc = describe_checkpoint(sd, num_classes)
    if name is None:
        if desc["network"] is None:
            raise WeightsError(f"{src}: cannot tell which network this is ({desc['summary']}); "
                               "pass the network name and the number of classes")
        name = desc["network"]
    name = normalize_network_name(name)
    if num_classes is None:
        if desc["num_classes"] is None:
            raise WeightsError(f"{src}: cannot tell the number of classes ({desc['summary']}); pass it")
        num_classes = desc["num_classes"]
    if name.startswith("small"):
        kwargs = {**small_net_kwargs(sd), **kwargs}
    model = build_network(name, num_classes, **kwargs)
    load_weights(model, sd if isinstance(source, Mapping) else source)
    return model, desc


def read_pretrained(path) -> StateDict:
    """ImageNet weights as a trunk state_dict: an MXNet ``.params`` file (ResNet-38, renamed per
    reference.md 2.2) or a PyTorch file, with any ImageNet classifier removed."""
    path = Path(path)
    if path.suffix == ".params":
        sd = convert_mxnet_to_torch(mxnet_params.load_params(path))
    else:
        sd = load_state_dict_file(path)
    dropped = [k for k in sd if k in IMAGENET_CLASSIFIER_KEYS]
    for k in dropped:
        del sd[k]
    if dropped:
        logger.info("%s: dropped the ImageNet classifier %s", path, dropped)
    return sd


def load_pretrained(model: nn.Module, path) -> dict:
    """Initialise the trunk from ImageNet weights (``.params`` or ``.pth``); fc8 keeps its xavier
    init. Asserts that the keys left out are exactly the head's (fc8) and that the file has
    nothing the network lacks: a non-strict load whose result is checked, never a silent one.
    Returns {"missing": [...head keys...], "loaded": number of tensors loaded}."""
    path = Path(path)
    sd = read_pretrained(path)
    if any(k.startswith(HEAD_PREFIX) for k in sd):
        raise WeightsError(f"{path}: has a trained head ({describe_checkpoint(sd)['summary']}), so it is "
                           "not an ImageNet initialisation; load full checkpoints with load_weights "
                           "(e.g. infer.py --weights or train.py --resume)")
    sd = _fill_num_batches_tracked(model, sd)
    missing, unexpected, mismatched = _compare(model, sd)
    head = [k for k in model.state_dict() if k.startswith(HEAD_PREFIX)]
    if mismatched or unexpected or set(missing) != set(head):
        raise WeightsError(_mismatch_message(str(path), model, sd, [k for k in missing if k not in head],
                                             unexpected, mismatched, "ImageNet initialisation leaves "
                                             "exactly the head fc8 new"))
    result = model.load_state_dict(sd, strict=False)
    # The same check on PyTorch's own report (guards against _compare and PyTorch disagreeing).
    assert set(result.missing_keys) == set(head) and not result.unexpected_keys, result
    logger.info("ImageNet init from %s: %d tensors loaded, new: %s", path, len(sd), head)
    return dict(missing=list(result.missing_keys), loaded=len(sd))
