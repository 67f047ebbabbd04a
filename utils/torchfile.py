"""Reading PyTorch files safely, with every failure as one line.

``torch.load(path, map_location="cpu", weights_only=True)``: no code from a file runs. A file
torch cannot read gives one :class:`~utils.errors.WeightsError` line naming the file, what it
looks like (empty, text, an MXNet file, another format, corrupt or truncated, pickled Python
objects) and the fix. Used by the weights readers (network/weights.py) and by the resume
checkpoints of both training stages (utils/checkpoint.py).
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from utils.errors import WeightsError
from utils.io import describe_file_start, read_file_start

# The fix for a file that holds more than tensors: save the weights alone, from the session (or
# script) that built the model, which is where the objects' code is available and trusted anyway.
RESAVE_HINT = "re-save only the weights where the model was built: torch.save(model.state_dict(), PATH)"
REFETCH_HINT = "download or copy it again"


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


def _unreadable_message(path: Path, head: bytes, e: Exception,
                        resave_hint: str = RESAVE_HINT) -> str:
    """One line saying why torch.load could not read ``path``, and what to do about it."""
    kind, words = describe_file_start(head)
    size = path.stat().st_size
    if kind in ("zip", "torch-legacy", "pickle") and "Unsupported global" in str(e):
        # weights_only loading met a class or function: running it could run any code.
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        return (f"{path}: not a plain weights file: it holds Python objects other than tensors{what}, "
                f"which are refused for safety (no code from a weights file is run); {resave_hint}")
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


def looks_like_caffemodel(path: Path, head: bytes) -> bool:
    """A Caffe .caffemodel (a NetParameter protobuf: field 1 'name', a short text, then layers
    as field 100 or the legacy field 2), by its name or its first bytes."""
    if path.suffix.lower() == ".caffemodel":
        return True
    if len(head) < 4 or head[0] != 0x0A or not 0 < head[1] < 0x80 or len(head) < 3 + head[1]:
        return False
    name = head[2:2 + head[1]]
    return all(32 <= b < 127 for b in name) and head[2 + head[1]] in (0x12, 0xA2, 0x1A, 0x22)


CAFFE_HINT = ("convert it first: python -m network.caffemodel FILE.caffemodel "
              "deeplabv1_resnet101-coco.pth (bash script/download.sh weights fetches and converts "
              "DeepLab's init; docs/segmentation.md 'Initial weights')")


def load_torch_file(path, resave_hint: str = RESAVE_HINT, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, with every failure as one
    WeightsError line (see load_state_dict_file). ``resave_hint`` is the fix named for a file
    that holds Python objects (train.py's resume checkpoints need their own). ``mmap``: map the
    tensors instead of reading them (keys and shapes in a fraction of a second, for checks
    such as tools/preflight.py's; legacy-format files are read whole)."""
    path = Path(path)
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
    if looks_like_caffemodel(path, head):
        raise WeightsError(f"{path}: a Caffe .caffemodel, not a PyTorch file; "
                       f"{CAFFE_HINT.replace('FILE.caffemodel', str(path))}")
    try:
        obj = None
        if mmap and kind == "zip":
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except MemoryError:
                raise
            except Exception:  # noqa: BLE001 - read it whole below; its error is the message
                obj = None
        if obj is None:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, IndexError, EOFError, ... here
        # e.g. a text file: the legacy loader reads its first byte as a pickle opcode and raises
        # KeyError(101) for "e"; a cut zip raises RuntimeError; a cut legacy file IndexError.
        raise WeightsError(_unreadable_message(path, head, e, resave_hint)) from None
    return obj
