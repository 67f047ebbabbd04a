"""Read Caffe ``.caffemodel`` files with numpy alone, and convert DeepLab's COCO-pretrained
ResNet-101 ``init.caffemodel`` into the state dict that ``train_seg.py --init`` loads.

The paper's DeepLab-v2 initialisation is "the pretrained model of the official OAA code" (EPS
README), and OAA-PyTorch's README makes it with deeplab-pytorch: ``scripts/setup_caffemodels.sh``
downloads DeepLab's ``prototxt_and_model.zip`` (liangchiehchen.com), whose ``init.caffemodel``
``convert.py --dataset coco`` turns into ``deeplabv1_resnet101-coco.pth``. That conversion needs
deeplab-pytorch's generated protobuf module; this one reads the protobuf wire format directly,
as ``network/mxnet_params.py`` reads MXNet, and writes the same keys.

Wire format (protobuf encoding; field numbers from caffe.proto, BVLC/caffe
src/caffe/proto/caffe.proto, identical in deeplab-pytorch libs/caffe.proto)::

    every field: varint key = (field_number << 3) | wire_type, then
        wire 0 varint | wire 1 8 bytes | wire 2 varint length + bytes | wire 5 4 bytes
    NetParameter:     name = 1, layers = 2 (V1LayerParameter, deprecated), layer = 100 (LayerParameter)
    LayerParameter:   name = 1, type = 2 (string), blobs = 7, convolution_param = 106,
                      batch_norm_param = 139
    V1LayerParameter: name = 4, type = 5 (enum), blobs = 6, convolution_param = 10
    BlobProto:        num/channels/height/width = 1..4 (legacy 4-D shape), data = 5 (packed float),
                      diff = 6, shape = 7 (BlobShape: dim = 1, packed int64), double_data = 8
    ConvolutionParameter: pad = 3, kernel_size = 4, stride = 6, dilation = 18,
                      pad_h/pad_w = 9/10, kernel_h/kernel_w = 11/12, stride_h/stride_w = 13/14
    BatchNormParameter:   eps = 3 (float, default 1e-5)

A repeated scalar may come packed (wire 2) or one element per field; both are read.

The DeepLab names map onto deeplab-pytorch's module tree (its convert.py translate_layer_name):
``conv1`` / ``bn_conv1`` + ``scale_conv1`` -> ``layer1.conv1.{conv,bn}``; ``res<S><B>_branch<X>`` /
``bn<S><B>_branch<X>`` + ``scale...`` -> ``layer<S>.block<k>.{shortcut,reduce,conv3x3,increase}``
with block a/b/c = 1/2/3 and b<N> = N + 1 (ResNet-101's 23-block stage: a, b1 .. b22); branch 1 =
shortcut, 2a/2b/2c = reduce/conv3x3/increase; ``fc*`` -> ``fc`` (the 91-class COCO classifier,
dropped by train_seg) or, for three-part names such as ``fc1_voc12_c0``, ``aspp.c0``. Layers of the
multi-scale copies (``res075``, ``res05`` in the name) share the main branch's weights and are
skipped, as upstream. Caffe's BatchNorm stores running sums and a scale factor (blob 2):
mean and variance are the sums divided by it (a factor 0 gives 0, as Caffe's own BatchNorm layer);
the following Scale layer holds the affine weight and bias.
"""
from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from network.errors import WeightsError
from utils.io import describe_file_start

logger = logging.getLogger(__name__)

WIRE_VARINT, WIRE_64, WIRE_LEN, WIRE_32 = 0, 1, 2, 5
FIX = "download prototxt_and_model.zip again (bash script/download.sh weights)"

# V1LayerParameter.LayerType values (caffe.proto) of the layers that carry weights or are named
# in errors; the others keep their number.
V1_TYPES = {4: "Convolution", 14: "InnerProduct", 17: "Pooling", 18: "ReLU", 5: "Data",
            25: "Eltwise", 39: "Deconvolution", 6: "Dropout", 20: "Softmax", 21: "SoftmaxWithLoss"}


class CaffeModelError(WeightsError):
    """A file that is not a readable Caffe model, or one that does not convert (one line)."""


@dataclass
class ConvParam:
    kernel: Tuple[int, int] = (0, 0)   # 0: not given
    stride: Tuple[int, int] = (1, 1)
    pad: Tuple[int, int] = (0, 0)
    dilation: int = 1


@dataclass
class CaffeLayer:
    name: str
    type: str
    blobs: List[np.ndarray] = field(default_factory=list)  # float32, each with its stored shape
    conv: Optional[ConvParam] = None
    bn_eps: Optional[float] = None


# ------------------------------------------------------------------------------------------------
# wire format
# ------------------------------------------------------------------------------------------------
class _Wire:
    """Field iterator over a buffer region, with errors that name the file and the byte."""

    def __init__(self, buf, source: str):
        self.buf, self.source = buf, source

    def corrupt(self, msg: str, pos: int) -> CaffeModelError:
        return CaffeModelError(f"{self.source}: not a readable Caffe model: {msg} (at byte {pos} "
                               f"of {len(self.buf)}); {FIX}")

    def varint(self, pos: int, end: int) -> Tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= end:
                raise self.corrupt("a number runs past the end of its message (truncated?)", pos)
            b = self.buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7
            if shift > 63:
                raise self.corrupt("a number longer than 10 bytes", pos)

    def fields(self, start: int, end: int) -> Iterator[Tuple[int, int, object]]:
        """Yield (field number, wire type, value): an int for wire 0, (start, end) byte ranges
        for wire 2, the raw bytes for wires 1 and 5."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise self.corrupt("field number 0", pos)
            if wire == WIRE_VARINT:
                value, pos = self.varint(pos, end)
                yield number, wire, value
            elif wire == WIRE_LEN:
                n, pos = self.varint(pos, end)
                if pos + n > end:
                    raise self.corrupt(f"a field of {n} bytes runs past the end of its message "
                                       f"(truncated?)", pos)
                yield number, wire, (pos, pos + n)
                pos += n
            elif wire in (WIRE_64, WIRE_32):
                n = 8 if wire == WIRE_64 else 4
                if pos + n > end:
                    raise self.corrupt("a fixed-size field runs past the end (truncated?)", pos)
                yield number, wire, bytes(self.buf[pos:pos + n])
                pos += n
            else:  # 3/4: groups, which caffe.proto never uses
                raise self.corrupt(f"wire type {wire}", pos)

    def string(self, span) -> str:
        s, e = span
        try:
            return bytes(self.buf[s:e]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt("a layer name that is not text", s) from None

    def ints(self, wire: int, value) -> List[int]:
        """A repeated integer field element: packed (wire 2) or single (wire 0)."""
        if wire == WIRE_VARINT:
            return [value]
        if wire != WIRE_LEN:
            raise self.corrupt(f"an integer field with wire type {wire}", 0)
        out, pos = [], value[0]
        while pos < value[1]:
            v, pos = self.varint(pos, value[1])
            out.append(v)
        return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _append_reals(w: _Wire, wire: int, value, out: List[np.ndarray], dtype: str,
                  single_wire: int, what: str) -> None:
    """A repeated float/double field: packed (one length-delimited run) or one value per field
    (``single_wire``); other wire types are skipped, as protobuf does."""
    size = np.dtype(dtype).itemsize
    if wire == WIRE_LEN:
        s, e = value
        if (e - s) % size:
            raise w.corrupt(f"{what} of {e - s} bytes", s)
        out.append(np.frombuffer(w.buf, dtype=dtype, count=(e - s) // size, offset=s))
    elif wire == single_wire:
        out.append(np.frombuffer(value, dtype=dtype))


def _parse_blob(w: _Wire, start: int, end: int, where: str) -> np.ndarray:
    legacy = [0, 0, 0, 0]
    shape: Optional[List[int]] = None
    chunks: List[np.ndarray] = []
    doubles: List[np.ndarray] = []
    for number, wire, value in w.fields(start, end):
        if number in (1, 2, 3, 4) and wire == WIRE_VARINT:
            legacy[number - 1] = _signed64(value)
        elif number == 5:  # data: packed float32, or one float per field
            _append_reals(w, wire, value, chunks, "<f4", WIRE_32, f"{where}: float data")
        elif number == 8:  # double_data
            _append_reals(w, wire, value, doubles, "<f8", WIRE_64, f"{where}: double data")
        elif number == 7 and wire == WIRE_LEN:  # BlobShape
            shape = shape or []
            for n2, wire2, v2 in w.fields(*value):
                if n2 == 1:
                    shape.extend(_signed64(d) for d in w.ints(wire2, v2))
        # diff (6), double_diff (9) and unknown fields: skipped
    if chunks and doubles:
        raise w.corrupt(f"{where}: a blob with both float and double data", start)
    # Copy: the arrays must not pin the memory-mapped file.
    data = np.concatenate(chunks).astype(np.float32) if chunks else \
        np.concatenate(doubles).astype(np.float32) if doubles else np.zeros(0, np.float32)
    if shape is None:
        shape = legacy if any(legacy) else [data.size]
    if any(d < 0 for d in shape):
        raise w.corrupt(f"{where}: negative dimension in shape {shape}", start)
    if math.prod(shape) != data.size:
        raise w.corrupt(f"{where}: shape {tuple(shape)} holds {math.prod(shape)} values but the "
                        f"blob has {data.size}", start)
    return data.reshape(shape)


def _pair(values: List[int], h: Optional[int], w_: Optional[int], default: int) -> Tuple[int, int]:
    if h is not None or w_ is not None:
        return (h if h is not None else default, w_ if w_ is not None else default)
    if not values:
        return (default, default)
    return (values[0], values[-1]) if len(values) <= 2 else (values[0], values[1])


def _parse_conv(w: _Wire, span) -> ConvParam:
    lists: Dict[int, List[int]] = {3: [], 4: [], 6: [], 18: []}
    single: Dict[int, int] = {}
    for number, wire, value in w.fields(*span):
        if number in lists:
            lists[number].extend(w.ints(wire, value))
        elif number in (9, 10, 11, 12, 13, 14) and wire == WIRE_VARINT:
            single[number] = value
    return ConvParam(kernel=_pair(lists[4], single.get(11), single.get(12), 0),
                     stride=_pair(lists[6], single.get(13), single.get(14), 1),
                     pad=_pair(lists[3], single.get(9), single.get(10), 0),
                     dilation=lists[18][0] if lists[18] else 1)


def _parse_layer(w: _Wire, span, v1: bool) -> CaffeLayer:
    name_f, type_f, blobs_f, conv_f = (4, 5, 6, 10) if v1 else (1, 2, 7, 106)
    layer = CaffeLayer(name="", type="")
    for number, wire, value in w.fields(*span):
        if number == name_f and wire == WIRE_LEN:
            layer.name = w.string(value)
        elif number == type_f:
            layer.type = (V1_TYPES.get(value, f"V1 type {value}") if wire == WIRE_VARINT
                          else w.string(value))
        elif number == blobs_f and wire == WIRE_LEN:
            layer.blobs.append(_parse_blob(w, *value, where=f"layer {layer.name or '?'}"))
        elif number == conv_f and wire == WIRE_LEN:
            layer.conv = _parse_conv(w, value)
        elif not v1 and number == 139 and wire == WIRE_LEN:
            for n2, wire2, v2 in w.fields(*value):
                if n2 == 3 and wire2 == WIRE_32:
                    layer.bn_eps = struct.unpack("<f", v2)[0]
            if layer.bn_eps is None:
                layer.bn_eps = 1e-5  # caffe.proto default
    return layer


def read_caffemodel_bytes(buf, source: str = "<buffer>") -> Tuple[str, List[CaffeLayer]]:
    """Parse a serialized NetParameter. Returns (net name, layers in file order)."""
    w = _Wire(buf, source)
    if len(buf) == 0:
        raise CaffeModelError(f"{source}: empty (0 bytes), not a Caffe model; {FIX}")
    kind, words = describe_file_start(bytes(buf[:64]))
    # A failed download is often an HTML page; the other kinds are files of another format.
    if kind in ("zip", "gzip", "torch-legacy", "mxnet", "npy", "hdf5", "image", "pickle") or \
            words.startswith("an HTML page"):
        hint = ("unzip it first (the model is init.caffemodel inside prototxt_and_model.zip)"
                if kind == "zip" else FIX)
        raise CaffeModelError(f"{source}: not a Caffe model (it starts with {words}); {hint}")
    name, layers = "", []
    for number, wire, value in w.fields(0, len(buf)):
        if number == 1 and wire == WIRE_LEN:
            name = w.string(value)
        elif number in (2, 100) and wire == WIRE_LEN:
            layers.append(_parse_layer(w, value, v1=(number == 2)))
    if not layers:
        raise CaffeModelError(f"{source}: no layers found; not a Caffe model (it starts with "
                              f"{words}); {FIX}")
    return name, layers


def read_caffemodel(path) -> Tuple[str, List[CaffeLayer]]:
    """Read a .caffemodel file (memory-mapped; the blobs are copied out)."""
    path = Path(path)
    if not path.is_file():
        raise CaffeModelError(f"{path}: file not found; {FIX}")
    if path.stat().st_size == 0:
        raise CaffeModelError(f"{path}: empty (0 bytes), not a Caffe model; {FIX}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        name, layers = read_caffemodel_bytes(mm, str(path))
        for layer in layers:  # detach from the map before it closes
            layer.blobs = [np.array(b, dtype=np.float32, copy=True) for b in layer.blobs]
    return name, layers


# ------------------------------------------------------------------------------------------------
# DeepLab names -> deeplab-pytorch keys
# ------------------------------------------------------------------------------------------------
_BRANCH = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}
_RES = re.compile(r"^(res|bn|scale)(\d)([a-z])(\d*)_branch(1|2a|2b|2c)$")
_STEM = {"conv1": "layer1.conv1.conv", "bn_conv1": "layer1.conv1.bn", "scale_conv1": "layer1.conv1.bn"}


def deeplab_module_name(layer_name: str) -> Optional[str]:
    """The deeplab-pytorch module a DeepLab Caffe layer fills, or None for a layer without one.

    res4b22_branch2c -> layer4.block23.increase.conv; bn3a_branch1 -> layer3.block1.shortcut.bn."""
    if layer_name in _STEM:
        return _STEM[layer_name]
    m = _RES.match(layer_name)
    if m:
        kind, stage, letter, number, branch = m.groups()
        if number:
            block = int(number) + 1  # b1 .. b22 follow a: blocks 2 .. 23
        else:
            block = ord(letter) - ord("a") + 1
        leaf = "conv" if kind == "res" else "bn"
        return f"layer{stage}.block{block}.{_BRANCH[branch]}.{leaf}"
    if layer_name.startswith("fc"):
        parts = layer_name.split("_")
        return f"aspp.{parts[2]}" if len(parts) == 3 else "fc"
    return None


def skipped_layer(name: str) -> bool:
    """Layers of DeepLab's multi-scale input copies: they share the main branch's weights."""
    return "res075" in name or "res05" in name


def caffe_layers_to_state_dict(layers: Sequence[CaffeLayer], source: str = "caffemodel"
                               ) -> "OrderedDict[str, np.ndarray]":
    """{deeplab-pytorch key: float32 array (as stored)} from DeepLab layers; num_batches_tracked
    is added as 0 for every BatchNorm (deeplab-pytorch convert.py writes it too). Shapes are the
    blobs' own; convert_init reshapes them onto the model."""
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    eps: Dict[str, float] = {}
    unknown = []
    for layer in layers:
        if skipped_layer(layer.name) or not layer.blobs:
            continue
        module = deeplab_module_name(layer.name)
        if layer.type in ("Convolution", "InnerProduct") and module is not None:
            out[f"{module}.weight"] = layer.blobs[0]
            if len(layer.blobs) > 1:
                out[f"{module}.bias"] = layer.blobs[1]
        elif layer.type == "BatchNorm" and module is not None:
            if len(layer.blobs) != 3:
                raise CaffeModelError(f"{source}: BatchNorm layer {layer.name} has "
                                      f"{len(layer.blobs)} blobs, expected 3 (mean, variance, "
                                      f"scale factor); {FIX}")
            factor = float(layer.blobs[2].reshape(-1)[0])
            # In float64 as deeplab-pytorch convert.py (numpy division), rounded once to float32
            # (the same value its float64 tensors take when train_seg loads them).
            for i, leaf in ((0, "running_mean"), (1, "running_var")):
                sums = layer.blobs[i].astype(np.float64)
                out[f"{module}.{leaf}"] = (sums / factor if factor else 0 * sums).astype(np.float32)
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
            eps[module] = layer.bn_eps if layer.bn_eps is not None else 1e-5
        elif layer.type == "Scale" and module is not None:
            # The affine half of the BatchNorm of the same name (bn2a_branch1 / scale2a_branch1).
            if f"{module}.running_mean" not in out or f"{module}.weight" in out:
                raise CaffeModelError(f"{source}: Scale layer {layer.name} has no BatchNorm layer "
                                      f"before it; {FIX}")
            if len(layer.blobs) != 2:
                raise CaffeModelError(f"{source}: Scale layer {layer.name} has "
                                      f"{len(layer.blobs)} blobs, expected 2 (weight, bias)")
            out[f"{module}.weight"] = layer.blobs[0]
            out[f"{module}.bias"] = layer.blobs[1]
        else:
            unknown.append(f"{layer.name} ({layer.type})")
    if unknown:
        raise CaffeModelError(f"{source}: {len(unknown)} layers with weights that are not part of "
                              f"DeepLab's ResNet-101 (first: {', '.join(unknown[:4])}); is this "
                              f"init.caffemodel from prototxt_and_model.zip?")
    bad_eps = {m: e for m, e in eps.items() if abs(e - 1e-5) > 1e-7}
    if bad_eps:
        m, e = next(iter(bad_eps.items()))
        raise CaffeModelError(f"{source}: BatchNorm eps {e} at {m}; DeepLab's ResNet-101 uses "
                              f"1e-5 (as network/deeplab.py)")
    return out


def reference_init_shapes(arch: str = "deeplabv2_resnet101", n_fc: int = 91
                          ) -> "OrderedDict[str, Tuple[int, ...]]":
    """Keys and shapes of deeplab-pytorch's DeepLabV1_ResNet101 init file for ``arch``: the
    DeepLab-v2 backbone (layer1..layer5, our network/deeplab.py tree) plus the 1x1 ``fc``
    classifier with ``n_fc`` outputs (91 for COCO), no "base." prefix."""
    import torch
    from network.deeplab import build_deeplab
    with torch.device("meta"):  # shapes only
        base = build_deeplab(arch, 2).base
    shapes = OrderedDict((k, tuple(v.shape)) for k, v in base.state_dict().items()
                         if not k.startswith("aspp."))
    width = base.aspp.c0.in_channels
    shapes["fc.weight"] = (n_fc, width, 1, 1)
    shapes["fc.bias"] = (n_fc,)
    return shapes


def check_conv_geometry(layers: Sequence[CaffeLayer], arch: str, source: str) -> int:
    """Every convolution's stride, padding and dilation equal the module it fills (deeplab-pytorch
    convert.py checks the same). Returns the number checked."""
    import torch.nn as nn
    import torch
    from network.deeplab import build_deeplab
    with torch.device("meta"):
        base = build_deeplab(arch, 2).base
    modules = dict(base.named_modules())
    n = 0
    for layer in layers:
        if skipped_layer(layer.name) or layer.conv is None or layer.type != "Convolution":
            continue
        module = deeplab_module_name(layer.name)
        conv = modules.get(module) if module else None
        if not isinstance(conv, nn.Conv2d):
            continue
        got = (layer.conv.stride, layer.conv.pad, layer.conv.dilation)
        want = (tuple(conv.stride), tuple(conv.padding), conv.dilation[0])
        if got != want:
            raise CaffeModelError(f"{source}: layer {layer.name}: stride/pad/dilation {got} in the "
                                  f"file, {want} in {arch} ({module}); not DeepLab's ResNet-101")
        n += 1
    return n


def convert_init(path, arch: str = "deeplabv2_resnet101", n_fc: int = 91
                 ) -> "OrderedDict[str, object]":
    """init.caffemodel -> the deeplabv1_resnet101-coco.pth state dict (torch tensors), checked key
    for key and shape for shape against ``reference_init_shapes(arch, n_fc)``, then loaded the
    way train_seg.py --init loads it (network.deeplab.load_init_state_dict)."""
    import torch
    from network.deeplab import build_deeplab, load_init_state_dict
    _, layers = read_caffemodel(path)
    arrays = caffe_layers_to_state_dict(layers, str(path))
    ref = reference_init_shapes(arch, n_fc)
    missing = [k for k in ref if k not in arrays]
    extra = [k for k in arrays if k not in ref]
    if missing or extra:
        raise CaffeModelError(f"{path}: {len(arrays)} tensors converted, {len(ref)} expected for "
                              f"{arch} + a {n_fc}-class fc; missing {missing[:4]}, unexpected "
                              f"{extra[:4]}")
    sd: "OrderedDict[str, object]" = OrderedDict()
    for k, shape in ref.items():  # the reference's order: the order of the module tree
        a = arrays[k]
        if a.size != math.prod(shape):
            raise CaffeModelError(f"{path}: {k} has {a.size} values in the file, {shape} expected")
        # view_as, as deeplab-pytorch: Caffe stores conv weights as (out, in, kh, kw) already
        sd[k] = torch.from_numpy(np.ascontiguousarray(a).reshape(shape))
    n_conv = check_conv_geometry(layers, arch, str(path))
    # The proof that train_seg.py will accept it: its own loader, on a fresh model.
    load_init_state_dict(build_deeplab(arch, 21), dict(sd), "deeplab", source=str(path))
    logger.info("%s: %d layers read, %d tensors converted, %d convolutions' geometry checked",
                path, len(layers), len(sd), n_conv)
    return sd


def get_args_parser():
    import argparse
    from utils.cli import add_flag, parent_parser
    p = parent_parser("Convert DeepLab's init.caffemodel to deeplabv1_resnet101-coco.pth")
    p.add_argument("caffemodel", type=Path, help="init.caffemodel (from prototxt_and_model.zip)")
    p.add_argument("output", type=Path, nargs="?", default=None,
                   help="output .pth (deeplabv1_resnet101-coco.pth); without it, list the layers")
    add_flag(p, "--arch", type=str, default="deeplabv2_resnet101",
             help="DeepLab architecture of network/deeplab.py the file must fit "
                  "(paper: deeplabv2_resnet101)")
    add_flag(p, "--force", action=argparse.BooleanOptionalAction, default=False,
             help="overwrite an existing output")
    return p


def main(args) -> None:
    """python -m network.caffemodel init.caffemodel [out.pth]: list the layers, or convert."""
    if args.output is None:
        _, layers = read_caffemodel(args.caffemodel)
        for layer in layers:
            print(f"{layer.name:30s} {layer.type:14s} {[tuple(b.shape) for b in layer.blobs]}")
        return
    if args.output.exists() and not args.force:
        raise CaffeModelError(f"{args.output} exists; pass --force to overwrite it")
    from utils.run import check_writable
    check_writable(args.output.parent, "output")  # before the conversion, not at the write
    from utils.io import torch_save
    torch_save(convert_init(args.caffemodel, args.arch), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    import sys

    from utils.cli import run_cli
    sys.exit(run_cli(get_args_parser, main, __doc__))
