"""network/caffemodel.py: the Caffe reader and DeepLab's init conversion, without Caffe.

The .caffemodel bytes are written here from the protobuf encoding and caffe.proto's field numbers
(NetParameter.layer = 100, .layers = 2; LayerParameter name/type/blobs = 1/2/7,
convolution_param = 106, batch_norm_param = 139; V1LayerParameter name/type/blobs = 4/5/6;
BlobProto num..width = 1..4, data = 5, shape = 7 with BlobShape.dim = 1; ConvolutionParameter
pad/kernel_size/stride/dilation = 3/4/6/18), independently of the reader. The expected state dict
is computed here from the values written, and compared key for key.
"""
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from network.caffemodel import (CaffeModelError, caffe_layers_to_state_dict, convert_init,
                                deeplab_module_name, read_caffemodel, read_caffemodel_bytes,
                                reference_init_shapes)
from network.deeplab import build_deeplab, load_init_state_dict


# ------------------------------------------------------------------------------------------------
# protobuf writer (encoding spec: varint keys (field << 3 | wire), length-delimited messages)
# ------------------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return key(field, 2) + varint(len(payload)) + payload


def vint(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def blob(a: np.ndarray, style: str = "shape") -> bytes:
    a = np.asarray(a, np.float32)
    if style == "shape":      # BlobShape, packed dims, packed data
        head = ld(7, ld(1, b"".join(varint(d) for d in a.shape)))
        return head + ld(5, a.astype("<f4").tobytes())
    if style == "legacy":     # num/channels/height/width, padded in front to 4-D
        dims = (1,) * (4 - a.ndim) + a.shape
        return b"".join(vint(i + 1, d) for i, d in enumerate(dims)) + ld(5, a.astype("<f4").tobytes())
    if style == "unpacked":   # one float per field (wire 5), unpacked dims (wire 0)
        head = ld(7, b"".join(vint(1, d) for d in a.shape))
        return head + b"".join(key(5, 5) + struct.pack("<f", v) for v in a.reshape(-1))
    if style == "double":     # double_data (field 8)
        head = ld(7, ld(1, b"".join(varint(d) for d in a.shape)))
        return head + ld(8, a.astype("<f8").tobytes())
    raise ValueError(style)


def conv_param(kernel, stride, pad, dilation) -> bytes:
    out = vint(1, 7) + vint(4, kernel)   # num_output (ignored), kernel_size
    if stride != 1:
        out += vint(6, stride)
    if pad:
        out += vint(3, pad)
    if dilation != 1:
        out += ld(18, varint(dilation))  # packed repeated field
    return out


def layer(name, type_, blobs=(), conv=None, eps=None, style="shape") -> bytes:
    out = ld(1, name) + ld(2, type_) + b"".join(ld(7, blob(b, style)) for b in blobs)
    if conv is not None:
        out += ld(106, conv_param(*conv))
    if eps is not None:
        out += ld(139, key(3, 5) + struct.pack("<f", eps))
    return out


def v1_layer(name, type_enum, blobs=()) -> bytes:
    return ld(4, name) + vint(5, type_enum) + b"".join(ld(6, blob(b, "legacy")) for b in blobs)


def net(layers, v1=False) -> bytes:
    return ld(1, "DeepLab-ResNet") + b"".join(ld(2 if v1 else 100, lay) for lay in layers)


# ------------------------------------------------------------------------------------------------
# a DeepLab-style caffemodel for an architecture of network/deeplab.py
# ------------------------------------------------------------------------------------------------
def block_letter(k: int, n: int) -> str:
    """DeepLab's block names: a, b, c for stages of <= 3 blocks, else a, b1, b2, ..."""
    return "abc"[k - 1] if n <= 3 else ("a" if k == 1 else f"b{k - 1}")


def caffe_names(n_blocks):
    """(caffe conv/bn/scale base names, deeplab-pytorch module) in prototxt order."""
    out = [("conv1", "bn_conv1", "scale_conv1", "layer1.conv1")]
    for stage, n in zip((2, 3, 4, 5), n_blocks):
        for k in range(1, n + 1):
            b = f"{stage}{block_letter(k, n)}"
            branches = (["1"] if k == 1 else []) + ["2a", "2b", "2c"]
            for br in branches:
                mod = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}[br]
                out.append((f"res{b}_branch{br}", f"bn{b}_branch{br}", f"scale{b}_branch{br}",
                            f"layer{stage}.block{k}.{mod}"))
    return out


def write_deeplab_caffemodel(path, arch="deeplabv2_small", n_fc=5, seed=0, style="shape",
                             extra=b"", drop=None, bad_stride=None):
    """Write a caffemodel whose weights fit ``arch``; returns the expected state dict."""
    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        base = build_deeplab(arch, 2).base
    mods = dict(base.named_modules())
    ref = reference_init_shapes(arch, n_fc)
    layers = [layer("data", "Data")]
    expected = OrderedDict()
    for conv_name, bn_name, scale_name, mod in caffe_names(
            {"deeplabv2_small": (1, 1, 1, 1), "deeplabv2_resnet101": (3, 4, 23, 3)}[arch]):
        conv = mods[f"{mod}.conv"]
        w = rng.standard_normal(ref[f"{mod}.conv.weight"]).astype(np.float32)
        stride = conv.stride[0] if bad_stride != conv_name else conv.stride[0] + 1
        if conv_name != drop:
            layers.append(layer(conv_name, "Convolution", [w], style=style,
                                conv=(conv.kernel_size[0], stride, conv.padding[0], conv.dilation[0])))
        c = w.shape[0]
        mean, var = rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32) + 0.5
        factor = np.float32(999.982)
        gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        layers.append(layer(bn_name, "BatchNorm", [mean * factor, var * factor, np.array([factor])],
                            eps=1e-5, style=style))
        layers.append(layer(scale_name, "Scale", [gamma, beta], style=style))
        layers.append(layer(conv_name.replace("res", "relu") + "_x", "ReLU"))
        # the multi-scale copy of the same layer: shares weights, skipped by the converter
        layers.append(layer(conv_name + "_res075", "Convolution", [w * 0 + 7], style=style))
        expected[f"{mod}.conv.weight"] = torch.from_numpy(w)
        expected[f"{mod}.bn.weight"] = torch.from_numpy(gamma)
        expected[f"{mod}.bn.bias"] = torch.from_numpy(beta)
        expected[f"{mod}.bn.running_mean"] = torch.from_numpy(
            ((mean * factor).astype(np.float64) / np.float64(factor)).astype(np.float32))
        expected[f"{mod}.bn.running_var"] = torch.from_numpy(
            ((var * factor).astype(np.float64) / np.float64(factor)).astype(np.float32))
        expected[f"{mod}.bn.num_batches_tracked"] = torch.tensor(0)
    fc_w = rng.standard_normal(ref["fc.weight"]).astype(np.float32)
    fc_b = rng.standard_normal(n_fc).astype(np.float32)
    layers.append(layer("pool1", "Pooling"))
    layers.append(layer("fc1_coco", "Convolution", [fc_w, fc_b], conv=(1, 1, 0, 1), style=style))
    expected["fc.weight"] = torch.from_numpy(fc_w)
    expected["fc.bias"] = torch.from_numpy(fc_b)
    path.write_bytes(net(layers) + extra)
    return expected


# ------------------------------------------------------------------------------------------------
def test_names_cover_resnet101_exactly():
    """Every DeepLab ResNet-101 layer name maps onto a module of our DeepLab-v2 tree, and the
    converted keys are exactly those of deeplab-pytorch's DeepLabV1_ResNet101 (91-class fc)."""
    keys = set()
    for conv, bn, scale, mod in caffe_names((3, 4, 23, 3)):
        assert deeplab_module_name(conv) == f"{mod}.conv"
        assert deeplab_module_name(bn) == deeplab_module_name(scale) == f"{mod}.bn"
        keys |= {f"{mod}.conv.weight"} | {f"{mod}.bn.{leaf}" for leaf in (
            "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    keys |= {"fc.weight", "fc.bias"}
    ref = reference_init_shapes("deeplabv2_resnet101", 91)
    assert keys == set(ref) and len(ref) == 104 * 6 + 2  # 104 convs, each with a BN
    assert deeplab_module_name("res4b22_branch2c") == "layer4.block23.increase.conv"
    assert deeplab_module_name("fc1_voc12_c3") == "aspp.c3"
    assert deeplab_module_name("fc1_coco") == "fc" and deeplab_module_name("pool1") is None
    assert ref["fc.weight"] == (91, 2048, 1, 1)


@pytest.mark.parametrize("style", ["shape", "legacy", "unpacked", "double"])
def test_convert_key_for_key(tmp_path, style):
    path = tmp_path / "init.caffemodel"
    expected = write_deeplab_caffemodel(path, style=style)
    sd = convert_init(path, arch="deeplabv2_small", n_fc=5)
    assert list(sd) == list(reference_init_shapes("deeplabv2_small", 5))  # the module tree's order
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        assert torch.equal(sd[k], v), k
    # train_seg's loader takes it: the backbone equals the file, the ASPP is new, fc dropped
    model = build_deeplab("deeplabv2_small", 21)
    report = load_init_state_dict(model, dict(sd), "auto")
    assert report["kind"] == "deeplab" and report["dropped"] == ["fc.bias", "fc.weight"]
    own = model.base.state_dict()
    for k, v in expected.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v.to(own[k].dtype)), k


def test_v1_layers_are_read(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    data = net([v1_layer("conv1", 4, [w, np.ones(2, np.float32)]), v1_layer("relu1", 18)], v1=True)
    name, layers = read_caffemodel_bytes(data, "v1.caffemodel")
    assert name == "DeepLab-ResNet"
    assert [(lay.name, lay.type) for lay in layers] == [("conv1", "Convolution"), ("relu1", "ReLU")]
    assert layers[0].blobs[0].shape == (2, 3, 2, 2) and np.array_equal(layers[0].blobs[0], w)
    assert layers[0].blobs[1].shape == (1, 1, 1, 2)  # legacy 4-D, reshaped by the converter


def test_bad_files_are_one_line_errors(tmp_path):
    path = tmp_path / "init.caffemodel"
    write_deeplab_caffemodel(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeModelError, match="truncated"):
        read_caffemodel(cut)
    z = tmp_path / "z.caffemodel"
    z.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CaffeModelError, match="unzip it first"):
        read_caffemodel(z)
    html = tmp_path / "h.caffemodel"
    html.write_bytes(b"<!DOCTYPE html><html><body>quota exceeded</body></html>")
    with pytest.raises(CaffeModelError, match="HTML page"):
        read_caffemodel(html)
    with pytest.raises(CaffeModelError, match="file not found"):
        read_caffemodel(tmp_path / "none.caffemodel")
    for e in (CaffeModelError("x"),):
        assert "\n" not in str(e)


def test_wrong_models_are_refused(tmp_path):
    path = tmp_path / "a.caffemodel"
    write_deeplab_caffemodel(path, drop="res3a_branch2b")
    with pytest.raises(CaffeModelError, match=r"missing \['layer3.block1.conv3x3.conv.weight'\]"):
        convert_init(path, arch="deeplabv2_small", n_fc=5)
    write_deeplab_caffemodel(path, bad_stride="res3a_branch2a")
    with pytest.raises(CaffeModelError, match="res3a_branch2a: stride/pad/dilation"):
        convert_init(path, arch="deeplabv2_small", n_fc=5)
    write_deeplab_caffemodel(path, extra=ld(100, layer("conv_extra", "Convolution", [np.ones(3)])))
    with pytest.raises(CaffeModelError, match="not part of DeepLab's ResNet-101"):
        convert_init(path, arch="deeplabv2_small", n_fc=5)
    write_deeplab_caffemodel(path)  # fine for small, wrong class count of the fc for 91
    with pytest.raises(CaffeModelError, match="fc.weight has"):
        convert_init(path, arch="deeplabv2_small", n_fc=91)


def test_scale_without_batchnorm_is_refused():
    layers = read_caffemodel_bytes(net([layer("scale_conv1", "Scale", [np.ones(2), np.ones(2)])]))[1]
    with pytest.raises(CaffeModelError, match="no BatchNorm layer before it"):
        caffe_layers_to_state_dict(layers)


def test_command_line_lists_layers_and_refuses_an_unwritable_output(tmp_path, capsys):
    from network import caffemodel
    from utils.cli import run_cli
    path = tmp_path / "init.caffemodel"
    write_deeplab_caffemodel(path, n_fc=5)
    cli = lambda *argv: run_cli(caffemodel.get_args_parser, caffemodel.main,  # noqa: E731
                                caffemodel.__doc__, argv=[str(a) for a in argv])
    assert cli(path) in (0, None)
    assert "res3a_branch2a" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    assert cli(path, tmp_path / "a_file" / "out.pth", "--arch", "deeplabv2_small") == 2
    err = capsys.readouterr().err
    assert "output" in err and "is a file, not a folder" in err and "Traceback" not in err
