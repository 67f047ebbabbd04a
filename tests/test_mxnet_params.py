"""MXNet .params reader and the ResNet-38 renaming, without MXNet.

The byte fixtures are written here from the format (MXNet ndarray.cc NDArray::Save), independently
of the reader: each record format (legacy, V1, V2, V3), every dtype, sparse storage, names with and
without arg:/aux: prefixes, and truncated or foreign files. The renaming is checked on the full
list of ademxapp names (psa convert_mxnet_to_torch's scheme), and a full-size synthetic
file goes through tools/convert_resnet38.py.
"""
import hashlib
import struct

import numpy as np
import pytest
import torch

from network.mxnet_params import MXNetParamsError, load_params, read_ndarray_list
from network.resnet38d import ResNet38d, convert_mxnet_to_torch, mxnet_name_to_torch

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
FLAGS = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
         6: np.int64, 7: np.bool_, 8: np.int16, 9: np.uint16, 10: np.uint32, 11: np.uint64}
BF16 = 12
CPU = struct.pack("<ii", 1, 0)  # context: dev_type cpu, dev_id 0


# ------------------------------------------------------------------------------------------------
# writers, from the format description
# ------------------------------------------------------------------------------------------------
def tshape(shape):
    return struct.pack("<i", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)


def payload(a, flag):
    if flag == BF16:  # upper 16 bits of the float32 pattern
        return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(a, dtype=np.dtype(FLAGS[flag]).newbyteorder("<")).tobytes()


def rec_legacy(a, flag=0):
    a = np.asarray(a)
    return (struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape) + CPU
            + struct.pack("<i", flag) + payload(a, flag))


def rec_v1(a, flag=0):
    a = np.asarray(a)
    return (struct.pack("<I", V1) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
            + CPU + struct.pack("<i", flag) + payload(a, flag))


def rec_v2(a, flag=0, magic=V2):
    a = np.asarray(a)
    return (struct.pack("<Ii", magic, 0) + tshape(a.shape) + CPU + struct.pack("<i", flag)
            + payload(a, flag))


def rec_v3(a, flag=0):
    return rec_v2(a, flag, magic=V3)


def rec_row_sparse(dense, flag=0):
    rows = np.flatnonzero(np.abs(dense).reshape(len(dense), -1).sum(1)).astype(np.int64)
    values = dense[rows]
    return (struct.pack("<Ii", V2, 1) + tshape(values.shape) + tshape(dense.shape) + CPU
            + struct.pack("<i", flag) + struct.pack("<i", 6) + tshape(rows.shape)
            + payload(values, flag) + payload(rows, 6))


def rec_csr(dense, flag=0):
    r, c = np.nonzero(dense)
    values = dense[r, c]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=dense.shape[0]))]).astype(np.int64)
    cols = c.astype(np.int64)
    return (struct.pack("<Ii", V2, 2) + tshape(values.shape) + tshape(dense.shape) + CPU
            + struct.pack("<i", flag) + struct.pack("<i", 6) + tshape(indptr.shape)
            + struct.pack("<i", 6) + tshape(cols.shape)
            + payload(values, flag) + payload(indptr, 6) + payload(cols, 6))


def ndarray_file(records, names=()):
    out = struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", len(records)) + b"".join(records)
    out += struct.pack("<Q", len(names))
    for n in names:
        out += struct.pack("<Q", len(n.encode())) + n.encode()
    return out


def sample(flag, shape=(2, 3, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    if flag == 7:
        return rng.random(shape) > 0.5
    if flag == BF16:  # values exactly representable in bfloat16
        bits = np.asarray(rng.standard_normal(shape), np.float32).view(np.uint32)
        return (bits & 0xFFFF0000).view(np.float32)
    dtype = np.dtype(FLAGS[flag])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape, endpoint=True).astype(dtype)


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", [rec_legacy, rec_v1, rec_v2, rec_v3])
@pytest.mark.parametrize("flag", sorted(FLAGS) + [BF16])
def test_every_format_and_dtype(writer, flag):
    a = sample(flag)
    arrays, names = read_ndarray_list(ndarray_file([writer(a, flag)], ["arg:x"]))
    assert names == ["arg:x"]
    got = arrays[0]
    assert got.shape == a.shape
    assert got.dtype == (np.float32 if flag == BF16 else FLAGS[flag])
    np.testing.assert_array_equal(got, a)


def test_mixed_formats_in_one_file_and_prefixes(tmp_path):
    """Names with and without arg:/aux: prefixes; load_params strips them unless asked."""
    arrays = {"arg:conv1a_weight": sample(0, (4, 3, 3, 3)), "aux:bn7_moving_mean": sample(0, (4,), 1),
              "bn7_gamma": sample(2, (4,), 2), "arg:bn7_beta": sample(1, (4,), 3)}
    records = [rec_legacy(arrays["arg:conv1a_weight"]), rec_v1(arrays["aux:bn7_moving_mean"]),
               rec_v2(arrays["bn7_gamma"], 2), rec_v3(arrays["arg:bn7_beta"], 1)]
    path = tmp_path / "mixed.params"
    path.write_bytes(ndarray_file(records, list(arrays)))
    plain = load_params(path)
    assert list(plain) == ["conv1a_weight", "bn7_moving_mean", "bn7_gamma", "bn7_beta"]
    for (k, a), (k2, b) in zip(arrays.items(), plain.items()):
        np.testing.assert_array_equal(a, b)
        assert b.flags.writeable and b.flags.c_contiguous
    assert list(load_params(path, keep_prefix=True)) == list(arrays)


def test_empty_scalar_and_unknown_shapes():
    records = [
        struct.pack("<I", 0),                                   # legacy ndim 0: none
        struct.pack("<II", V1, 0),                              # V1 ndim 0: none
        struct.pack("<Ii", V2, 0) + tshape(()),                 # V2 ndim 0: none
        struct.pack("<Ii", V3, 0) + struct.pack("<i", -1),      # V3 unknown ndim: none
        struct.pack("<Ii", V3, 0) + tshape((2, -1)),            # V3 unknown dim: none
        struct.pack("<Ii", V3, 0) + tshape(()) + CPU + struct.pack("<i", 0) + payload(np.float32(2.5), 0),
        rec_legacy(np.arange(3, dtype=np.float32)),             # the stream is still in step
    ]
    arrays, names = read_ndarray_list(ndarray_file(records))
    assert names == []
    assert [a.size for a in arrays[:5]] == [0] * 5
    assert arrays[5].shape == () and float(arrays[5]) == 2.5  # V3 scalar
    np.testing.assert_array_equal(arrays[6], [0, 1, 2])


def test_sparse_records_are_densified():
    rs = np.zeros((5, 3), np.float32)
    rs[1] = [1, 2, 3]
    rs[4] = [4, 5, 6]
    csr = np.zeros((3, 4), np.float64)
    csr[0, 1], csr[2, 0], csr[2, 3] = 7, 8, 9
    arrays, _ = read_ndarray_list(ndarray_file([rec_row_sparse(rs), rec_csr(csr, 1), rec_v2(rs)]))
    np.testing.assert_array_equal(arrays[0], rs)
    np.testing.assert_array_equal(arrays[1], csr)
    np.testing.assert_array_equal(arrays[2], rs)


def test_truncated_file_gives_clear_error(tmp_path):
    data = ndarray_file([rec_legacy(sample(0)), rec_v2(sample(0, (3,)))], ["arg:a", "arg:b"])
    for cut in (10, 30, 60, len(data) - 3):
        path = tmp_path / f"cut{cut}.params"
        path.write_bytes(data[:cut])
        with pytest.raises(MXNetParamsError, match=r"cut\d+\.params.*(truncated|too short)"):
            load_params(path)


def test_foreign_and_broken_files(tmp_path):
    torch_file = tmp_path / "model.params"
    torch.save({"a": torch.zeros(2)}, torch_file)
    with pytest.raises(MXNetParamsError, match=r"not an MXNet \.params file \(it starts with "
                                                r"b'PK\\x03\\x04', a zip archive\).*give the file a \.pth name"):
        load_params(torch_file)
    unnamed = tmp_path / "unnamed.params"
    unnamed.write_bytes(ndarray_file([rec_legacy(sample(0))]))
    with pytest.raises(MXNetParamsError, match="no names"):
        load_params(unnamed)
    bad_flag = ndarray_file([rec_legacy(sample(0))[:-4 * 12 - 4] + struct.pack("<i", 99) + b"\0" * 48], ["x"])
    with pytest.raises(MXNetParamsError, match="type_flag 99"):
        read_ndarray_list(bad_flag)
    with pytest.raises(MXNetParamsError, match="names for"):
        read_ndarray_list(ndarray_file([rec_legacy(sample(0))], ["a", "b"]))
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.params")


def _one_line_error(path, match):
    with pytest.raises(MXNetParamsError) as e:
        load_params(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and msg.endswith("download or copy it again"), msg
    assert __import__("re").search(match, msg), msg
    return msg


def test_corrupt_header_is_not_called_truncated(tmp_path):
    """A header field no real file has says "corrupt"; a plausible header whose data is cut says
    "truncated: N of at least M bytes"."""
    good = ndarray_file([rec_v2(sample(0)), rec_v2(sample(0, (3,)))], ["arg:a", "arg:b"])
    first_dim = 16 + 8 + 4 + 4 + 4  # list header, count, V2 magic, stype, ndim
    cases = {
        # a flipped high byte of the first dimension: 43 GB of data claimed by a 206-byte file
        "bigdim": good[:first_dim + 3] + b"\x6c" + good[first_dim + 4:],
        # ndim 2**24 + 4
        "ndim": good[:first_dim - 1] + b"\x01" + good[first_dim:],
        # dimension -5 (only -1, "unknown", exists)
        "negdim": good[:first_dim] + struct.pack("<q", -5) + good[first_dim + 8:],
        # an array count no file of this size can hold
        "count": good[:16] + struct.pack("<Q", 10 ** 12) + good[24:],
        # a name length beyond the file
        "name": good[:-13] + struct.pack("<Q", 1 << 40) + good[-5:],
        # a legacy record whose first word is no magic and no small ndim
        "legacy": ndarray_file([struct.pack("<I", 0x01020304) + b"\0" * 40], ["arg:a"]),
        "stype": good[:16 + 8 + 4] + struct.pack("<i", 7) + good[16 + 8 + 8:],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.params"
        path.write_bytes(data)
        msg = _one_line_error(path, r": corrupt: ")
        assert "truncated" not in msg, msg
    assert "43486543920 bytes in a file of 206 bytes" in _one_line_error(tmp_path / "bigdim.params", "")
    # Truncated: the header is fine, the data ends early.
    (tmp_path / "cut.params").write_bytes(good[:100])  # inside the data of array 0
    _one_line_error(tmp_path / "cut.params", r": truncated: 100 of at least 128 bytes \(the file ends in array 0 of 2\)")


def test_empty_text_and_random_files(tmp_path):
    (tmp_path / "empty.params").write_bytes(b"")
    _one_line_error(tmp_path / "empty.params", r": empty \(0 bytes\), not an MXNet \.params file")
    (tmp_path / "page.params").write_text("<!DOCTYPE html>\n<html><body>Not Found</body></html>\n")
    _one_line_error(tmp_path / "page.params", r"not an MXNet \.params file \(it starts with an HTML page "
                                              r"'<!DOCTYPE html>\\n<html>")
    (tmp_path / "text.params").write_text("hello\n")
    _one_line_error(tmp_path / "text.params", r"it starts with text 'hello\\n'")
    (tmp_path / "random.params").write_bytes(b"\xde\xad\xbe\xef" + np.random.default_rng(0).bytes(996))
    _one_line_error(tmp_path / "random.params", r"it starts with bytes de ad be ef ")


@pytest.mark.slow
def test_unreadable_params_reach_the_user_as_one_line(tmp_path):
    """load_pretrained (train.py --weights x.params) raises a WeightsError, which the entry points
    report as one line; the converter prints one "error:" line and a non-zero status."""
    import subprocess
    import sys
    from pathlib import Path

    from network import build_network
    from network.weights import WeightsError, load_pretrained

    path = tmp_path / "ilsvrc.params"
    path.write_bytes(ndarray_file([rec_legacy(sample(0))], ["arg:conv1a_weight"])[:50])
    model = build_network("small_cls", 2)
    with pytest.raises(WeightsError, match=r"ilsvrc\.params: truncated: 50 of at least"):
        load_pretrained(model, path)
    repo = Path(__file__).resolve().parent.parent
    env = dict(__import__("os").environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    for data in (b"", b"hello\n", path.read_bytes()):
        path.write_bytes(data)
        r = subprocess.run([sys.executable, str(repo / "tools" / "convert_resnet38.py"), str(path),
                            str(tmp_path / "out.pth")], env=env, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"convert_resnet38.py: error: {path}: "), r.stderr
        assert not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------------------------------
# renaming (psa network/resnet38d.py convert_mxnet_to_torch)
# ------------------------------------------------------------------------------------------------
def ademxapp_names():
    """The 193 names of the ademxapp ResNet-38 (A1) ImageNet checkpoint, from its naming scheme:
    per level L the blocks are <L>a, <L>b1, <L>b2, ...; a BN before each conv; 'res' convs."""
    blocks = {2: 3, 3: 3, 4: 6, 5: 3, 6: 1, 7: 1}
    bn = ("gamma", "beta", "moving_mean", "moving_var")
    names = ["arg:conv1a_weight"]
    for level, count in blocks.items():
        for i in range(count):
            s = "a" if i == 0 else f"b{i}"
            branches = ["branch2a", "branch2b1"] + (["branch2b2"] if level >= 6 else [])
            for br in branches:
                names += [f"{'aux' if 'moving' in p else 'arg'}:bn{level}{s}_{br}_{p}" for p in bn]
                names.append(f"arg:res{level}{s}_{br}_weight")
            if i == 0:
                names.append(f"arg:res{level}a_branch1_weight")
    names += [f"{'aux' if 'moving' in p else 'arg'}:bn7_{p}" for p in bn]
    names += ["arg:linear1000_weight", "arg:linear1000_bias"]
    return names


def test_renaming_covers_the_trunk_exactly():
    names = ademxapp_names()
    assert len(names) == 193
    mapped = [mxnet_name_to_torch(n) for n in names]
    assert mapped[-2:] == [None, None]  # the ImageNet classifier is dropped
    with torch.device("meta"):
        trunk = [k for k in ResNet38d().state_dict() if not k.endswith("num_batches_tracked")]
    assert len(trunk) == 191
    assert sorted(mapped[:-2]) == sorted(trunk) and len(set(mapped[:-2])) == 191


def test_renaming_examples():
    assert mxnet_name_to_torch("conv1a_weight") == "conv1a.weight"
    assert mxnet_name_to_torch("arg:res4b3_branch2b1_weight") == "b4_3.conv_branch2b1.weight"
    assert mxnet_name_to_torch("res4a_branch1_weight") == "b4.conv_branch1.weight"
    assert mxnet_name_to_torch("aux:bn5a_branch2a_moving_var") == "b5.bn_branch2a.running_var"
    assert mxnet_name_to_torch("bn6a_branch2b2_beta") == "b6.bn_branch2b2.bias"
    assert mxnet_name_to_torch("bn7_gamma") == "bn7.weight"
    assert mxnet_name_to_torch("linear1000_bias") is None
    for bad in ("fc8_weight", "res4b3_branch3_weight", "bn4b3_branch2a_weight"):
        with pytest.raises(KeyError):
            mxnet_name_to_torch(bad)


def test_convert_mxnet_to_torch_casts_and_drops():
    out = convert_mxnet_to_torch({"conv1a_weight": np.ones((64, 3, 3, 3), np.float16),
                                  "linear1000_weight": np.ones((1000, 4096), np.float32)})
    assert list(out) == ["conv1a.weight"] and out["conv1a.weight"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the full conversion tool on a full-size synthetic file
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_params(tmp_path_factory):
    """A full-size ResNet-38 .params (legacy records, as the 2016 file; uint8 data to keep it at
    105 MB): each array is filled with its own index, so the converted values show the mapping."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ResNet38d().state_dict().items()}
    names = ademxapp_names()
    path = tmp_path_factory.mktemp("mx") / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    fill = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", len(names)))
        for i, name in enumerate(names):
            key = mxnet_name_to_torch(name)
            shape = shapes[key] if key else ((1000, 4096) if name.endswith("weight") else (1000,))
            fill[key] = i % 250 + 1
            f.write(struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}I", *shape) + CPU
                    + struct.pack("<i", 3))
            f.write(np.full(shape, fill[key], np.uint8).tobytes())
        f.write(struct.pack("<Q", len(names)))
        for name in names:
            f.write(struct.pack("<Q", len(name)) + name.encode())
    return path, fill


@pytest.fixture(scope="module")
def converted(full_params, tmp_path_factory):
    from tools.convert_resnet38 import get_args_parser, main

    out = tmp_path_factory.mktemp("pth") / "resnet38d_imagenet.pth"
    args = get_args_parser().parse_args([str(full_params[0]), str(out)])
    return out, main(args), args


@pytest.mark.slow
def test_convert_tool_end_to_end(full_params, converted):
    from tools.convert_resnet38 import ConversionError, main

    out, digest, args = converted
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    sd = torch.load(out, weights_only=True)
    assert len(sd) == 191 + 37
    assert all(int(v) == 0 for k, v in sd.items() if k.endswith("num_batches_tracked"))
    for key, value in full_params[1].items():
        if key is not None:
            assert sd[key].dtype == torch.float32
            assert float(sd[key].flatten()[0]) == value and float(sd[key].flatten()[-1]) == value, key
    with pytest.raises(ConversionError, match="exists; pass --force"):  # never silently overwrite
        main(args)


@pytest.mark.slow
def test_convert_tool_output_is_byte_reproducible(full_params, converted, tmp_path, capsys):
    """The printed sha256 identifies the weights: converting the same file again, to another name
    in another folder, gives identical bytes (the archive inside no longer carries the random
    temporary file name)."""
    import filecmp

    from tools.convert_resnet38 import get_args_parser, main

    out2 = tmp_path / "again" / "resnet38d_copy.pth"
    digest2 = main(get_args_parser().parse_args([str(full_params[0]), str(out2)]))
    assert f"sha256 {digest2}  {out2}" in capsys.readouterr().out
    assert digest2 == converted[1] and filecmp.cmp(converted[0], out2, shallow=False)
    assert len(torch.load(out2, mmap=True)) == 191 + 37  # the published code's plain torch.load


def test_imagenet_init_from_params_and_from_pth(full_params, converted):
    """Training accepts the .params directly (as published) or the converted .pth; either way
    exactly fc8 is left new, and the trunk holds the file's values."""
    from network import build_network
    from network.weights import load_pretrained

    params, fill = full_params
    model = build_network("resnet38_cls", 20, pretrained=params)
    fc8 = model.fc8.weight.clone()
    sd = model.state_dict()
    for key in ("conv1a.weight", "b4_3.conv_branch2b1.weight", "b7.bn_branch2b2.running_var", "bn7.bias"):
        assert torch.all(sd[key] == fill[key]), key
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = load_pretrained(model, converted[0])
    assert result["missing"] == ["fc8.weight"] and result["loaded"] == 191 + 37
    assert torch.all(model.state_dict()["b5_2.conv_branch2a.weight"] == fill["b5_2.conv_branch2a.weight"])
    assert torch.all(model.fc8.weight == 0) and not torch.equal(fc8, model.fc8.weight)


def test_convert_tool_rejects_a_wrong_file(tmp_path):
    from tools.convert_resnet38 import ConversionError, convert

    path = tmp_path / "partial.params"
    path.write_bytes(ndarray_file([rec_legacy(sample(0, (64, 3, 3, 3)))], ["arg:conv1a_weight"]))
    with pytest.raises(ConversionError, match="1 trunk tensors after renaming, expected 191"):
        convert(path)
    path.write_bytes(ndarray_file([rec_legacy(sample(0, (64, 3, 3, 3)))], ["arg:fc6_weight"]))
    with pytest.raises(ConversionError, match="fc6_weight"):
        convert(path)


def test_preflight_reads_only_the_headers(full_params, tmp_path):
    """tools/preflight.py checks --weights with a header pass (shapes, no data read) against the
    network on the meta device; a truncated file is named as such there, before any compute."""
    from network.mxnet_params import read_shapes
    from network.weights import check_initial_weights
    params, _ = full_params
    shapes = read_shapes(params)
    assert len(shapes) == len(ademxapp_names()) and shapes["conv1a_weight"] == (64, 3, 3, 3)
    assert check_initial_weights(params, "resnet38_eps", 20) == "imagenet"
    cut = tmp_path / "cut.params"
    with open(params, "rb") as f:
        cut.write_bytes(f.read(10_000_000))
    with pytest.raises(MXNetParamsError, match="truncated"):
        check_initial_weights(cut, "resnet38_eps", 20)


def test_download_converts_the_params_and_checks_the_trunk(full_params, converted, tmp_path,
                                                           monkeypatch):
    """`bash script/download.sh weights` with the .params in place (as fetched, or put there by
    hand): tools/download.py's conversion step writes resnet38d_imagenet.pth, the same bytes as
    tools/convert_resnet38.py, and its check ('imagenet_trunk') accepts it; a rerun is 'present'."""
    import dataclasses
    import shutil

    from data import downloads as table
    from tools import download
    from utils.cli import build_parser

    params = full_params[0]
    root = tmp_path / "root"
    (root / "weights").mkdir(parents=True)
    shutil.copy(params, root / "weights" / params.name)
    row = dataclasses.replace(table.ROWS["imagenet_resnet38"], estimate=1000, unpacked=1000,
                              checksums=(("md5", hashlib.md5(params.read_bytes()).hexdigest()),))
    path = tmp_path / "table.json"
    path.write_text(table.table_to_json({row.key: row}, {"w": (row.key,)}))
    monkeypatch.setenv(download.TABLE_ENV, str(path))
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)

    def run():
        return download.main(build_parser(download.get_args_parser).parse_args(
            ["w", "--root", str(root)]))

    assert [r.status for r in run()] == ["done"]
    out = root / "weights" / "resnet38d_imagenet.pth"
    assert out.read_bytes() == converted[0].read_bytes()
    assert [r.status for r in run()] == ["present"]
