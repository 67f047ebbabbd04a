"""Loading checkpoints: safe reading, prefix and wrapper handling, describing what a checkpoint
is, strict loading with errors that name the right network, and ImageNet initialisation that
leaves exactly fc8 new. The published layouts are taken from tests/test_network_layout.py (written
from the published modules) and loaded into meta-device networks, so no 420 MB tensors are needed."""
import logging
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from network import build_network
from network.weights import (WeightsError, describe_checkpoint, identify_checkpoint,
                             load_network, load_pretrained, load_state_dict_file, load_weights,
                             network_record, record_network)
sys.path.insert(0, str(Path(__file__).parent))  # also under --import-mode=importlib
from test_network_layout import published_layout  # noqa: E402  (the reference-text layout)


def meta(name, num_classes):
    with torch.device("meta"):
        return build_network(name, num_classes)


def published_state_dict(fc8_rows, prefix="", with_counters=True):
    """A state_dict in the released layout (meta tensors: shapes only)."""
    return {prefix + k: torch.zeros(shape, device="meta",
                                    dtype=torch.int64 if k.endswith("tracked") else None)
            for k, shape in published_layout(fc8_rows)
            if with_counters or not k.endswith("num_batches_tracked")}


def small_sd(name="small_eps", num_classes=5, seed=0):
    torch.manual_seed(seed)
    return build_network(name, num_classes).state_dict()


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------
def test_load_state_dict_file_variants(tmp_path):
    sd = small_sd()
    plain, dp, project = tmp_path / "plain.pth", tmp_path / "dp.pth", tmp_path / "ckpt.pth"
    torch.save(sd, plain)
    torch.save({"module." + k: v for k, v in sd.items()}, dp)  # DataParallel
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iter": 7,
                "args": {"network": "small_eps", "lr": 0.01}}, project)
    for path in (plain, dp, project):
        got = load_state_dict_file(path)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd), path


def test_corrupt_truncated_and_unsafe_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(small_sd(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for path in (truncated, garbage):
        with pytest.raises(WeightsError, match=rf"{path.name}.*corrupt or truncated"):
            load_state_dict_file(path)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": small_sd(), "args": Namespace(lr=0.1)}, unsafe)  # a pickled object
    with pytest.raises(WeightsError, match="not a plain weights file: it holds Python objects other than tensors"):
        load_state_dict_file(unsafe)
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_state_dict_file(not_sd)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict_file(tmp_path / "missing.pth")
    params = tmp_path / "x.params"
    params.write_bytes(b"\0" * 32)
    with pytest.raises(WeightsError, match="convert_resnet38"):
        load_state_dict_file(params)


def _weights_error(path) -> str:
    with pytest.raises(WeightsError) as e:
        load_state_dict_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    assert "weights_only" not in msg and "will likely succeed" not in msg, msg  # never torch's advice
    return msg


def test_unreadable_files_give_one_line_each(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(small_sd(), good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save(small_sd(), legacy, _use_new_zipfile_serialization=False)
    files = {
        "empty.pth": b"",
        "cut_zip.pth": data[:len(data) // 2],
        "cut_zip_early.pth": data[:100],
        "cut_legacy.pth": legacy.read_bytes()[:300],
        "random.pth": b"\xde\xad\xbe\xef" + __import__("os").urandom(2000),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        msg = _weights_error(tmp_path / name)
        assert msg.endswith("corrupt or truncated - download or copy it again") or \
            ("corrupt or truncated PyTorch file" in msg and msg.endswith("download or copy it again")), msg
    assert "empty (0 bytes)" in _weights_error(tmp_path / "empty.pth")
    assert "it starts with bytes de ad be ef" in _weights_error(tmp_path / "random.pth")


def test_text_and_other_formats_are_named(tmp_path):
    """A text file once crashed with "KeyError: 101": torch's legacy loader read 'e' as a pickle
    opcode. Now: what the file starts with, and the fix."""
    import numpy as np

    text = tmp_path / "weights.pth"
    text.write_text("epoch 5 loss 0.3\n")
    msg = _weights_error(text)
    assert "not a PyTorch weights file (it starts with text 'epoch 5 loss 0.3\\n')" in msg
    assert "pass the .pth written by torch.save" in msg
    html = tmp_path / "page.pth"
    html.write_text("<html><body>404</body></html>")
    assert "(it starts with an HTML page '<html>" in _weights_error(html)
    npz = tmp_path / "arrays.pth"
    with open(npz, "wb") as f:
        np.savez(f, a=np.zeros(3))
    assert "a zip archive without data.pkl" in _weights_error(npz)
    npy = tmp_path / "array.pth"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    assert "a numpy .npy array" in _weights_error(npy)
    mx = tmp_path / "imagenet.pth"
    mx.write_bytes((0x112).to_bytes(8, "little") + bytes(40))
    assert "an MXNet .params file under another name" in _weights_error(mx)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_objects_are_refused_for_safety(tmp_path, legacy):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": small_sd(), "args": Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=not legacy)
    msg = _weights_error(path)
    assert "not a plain weights file" in msg and "(argparse.Namespace)" in msg
    assert "refused for safety (no code from a weights file is run)" in msg
    assert "torch.save(model.state_dict(), PATH)" in msg
    assert "corrupt" not in msg and "truncated" not in msg


# ------------------------------------------------------------------------------------------------
# identifying: the network record, else the shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,head,classes",
                         [(21, "eps", 20), (20, "cls", 20), (81, "eps", 80), (80, "cls", 80)])
def test_identify_published_checkpoints_by_shape(rows, head, classes):
    sd = published_state_dict(rows)
    found = identify_checkpoint(sd, classes)
    assert (found.network, found.num_classes) == (f"resnet38_{head}", classes)
    # The same fc8 rows also fit the other head for another class count: both are listed.
    other = {"eps": "cls", "cls": "eps"}[head]
    alt = classes + 1 if head == "eps" else classes - 1
    assert describe_checkpoint(sd) == (
        " or ".join(sorted([f"resnet38_{head} for {classes} classes",
                            f"resnet38_{other} for {alt} classes"], key=lambda t: "cls" not in t))
        .join(["fits ", f" (fc8 has {rows} rows)"]))
    with pytest.raises(WeightsError, match="but the dataset has 7 classes"):
        identify_checkpoint(sd, 7)
    assert identify_checkpoint(sd, classes, f"network.resnet38_{head}").network == f"resnet38_{head}"
    with pytest.raises(WeightsError, match=f"does not fit resnet38_{other} for {classes} classes"):
        identify_checkpoint(sd, classes, f"resnet38_{other}")


def test_identify_other_checkpoints():
    assert identify_checkpoint(meta("resnet101_cls", 20).state_dict(), 20).network == "resnet101_cls"
    found = identify_checkpoint(small_sd("small_eps", 5, ), 5)
    assert (found.network, found.options) == ("small_eps", {"width": 16, "blocks": 1})
    trunk = {k: v for k, v in published_state_dict(21).items() if not k.startswith("fc8")}
    assert "resnet38 trunk without a classifier head" in describe_checkpoint(trunk)
    assert "fits no registered network" in describe_checkpoint({"x.weight": torch.zeros(3)})
    # An ambiguous unrecorded file is refused where the class count is the user's own.
    with pytest.raises(WeightsError, match="pass --network"):
        identify_checkpoint(small_sd("small_eps", 5), 5, ambiguous_ok=False)


def test_network_record_decides_exactly(tmp_path):
    model = build_network("small_eps", 5, width=8, blocks=2, output_stride=4)
    path = tmp_path / "checkpoint_cls.pth"
    torch.save(record_network(model.state_dict(), model), path)
    sd = load_state_dict_file(path)
    assert network_record(sd) == {"network": "small_eps", "num_classes": 5,
                                  "options": {"width": 8, "blocks": 2, "output_stride": 4}}
    found = identify_checkpoint(sd, 5, ambiguous_ok=False)
    assert found.options["output_stride"] == 4  # not readable from the shapes, only the record
    # The record contradicts another class count or network: an error, never the other head.
    with pytest.raises(WeightsError, match="small_eps checkpoint for 5 classes .*dataset has 6"):
        identify_checkpoint(sd, 6)
    with pytest.raises(WeightsError, match="not small_cls"):
        identify_checkpoint(sd, 5, "small_cls")
    # ... and survives the DataParallel prefix and a {"model": ...} wrapper.
    wrapped = record_network(model.state_dict(), model)
    dp = type(wrapped)(("module." + k, v) for k, v in wrapped.items())
    dp._metadata = type(wrapped._metadata)(("module." + k if k else "module", v)
                                           for k, v in wrapped._metadata.items())
    torch.save({"model": dp}, tmp_path / "dp.pth")
    assert network_record(load_state_dict_file(tmp_path / "dp.pth"))["network"] == "small_eps"
    loaded, _ = load_network(path, 5)
    assert loaded.output_stride == 4 and torch.equal(loaded.fc8.weight, model.fc8.weight)


# ------------------------------------------------------------------------------------------------
# strict loading of full checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,num_classes,rows", [("resnet38_eps", 20, 21), ("resnet38_cls", 20, 20),
                                                   ("resnet38_eps", 80, 81), ("resnet38_cls", 80, 80)])
@pytest.mark.parametrize("prefix,counters", [("", True), ("module.", True), ("", False)])
def test_published_layouts_load_strictly(name, num_classes, rows, prefix, counters):
    result = load_weights(meta(name, num_classes), published_state_dict(rows, prefix, counters))
    assert result["missing"] == [] and result["unexpected"] == []


def test_wrong_head_error_names_the_right_network():
    with pytest.raises(WeightsError) as e:
        load_weights(meta("resnet38_cls", 20), published_state_dict(21))
    assert "For 20 classes use resnet38_eps." in str(e.value)
    with pytest.raises(WeightsError, match="For 20 classes use resnet38_cls"):
        load_weights(meta("resnet38_eps", 20), published_state_dict(20))
    with pytest.raises(WeightsError, match="resnet38_eps for 80 classes"):
        load_weights(meta("resnet38_eps", 20), published_state_dict(81))
    with pytest.raises(WeightsError, match="does not fit small_eps .* fits resnet38_cls"):
        load_weights(meta("small_eps", 20), published_state_dict(21))


def test_load_weights_round_trip_and_non_strict(tmp_path, caplog):
    sd = small_sd()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "iter": 3}, path)
    model = build_network("small_eps", 5)
    load_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    partial = {k: v for k, v in sd.items() if not k.startswith("stage4")}
    with pytest.raises(WeightsError, match="Missing from the file: stage4"):
        load_weights(build_network("small_eps", 5), partial)
    with caplog.at_level(logging.WARNING, logger="network.weights"):
        result = load_weights(build_network("small_eps", 5), partial, strict=False)
    assert result["missing"] and all(k.startswith("stage4") for k in result["missing"])
    assert "non-strict" in caplog.text
    wrong_width = small_sd()
    with pytest.raises(WeightsError, match="Shape mismatches"):
        load_weights(build_network("small_eps", 5, width=8), wrong_width, strict=False)


# ------------------------------------------------------------------------------------------------
# ImageNet initialisation
# ------------------------------------------------------------------------------------------------
def test_load_pretrained_leaves_exactly_fc8(tmp_path):
    donor = small_sd("small_cls", 5)
    trunk = {k: v for k, v in donor.items() if not k.startswith("fc8")}
    path = tmp_path / "trunk.pth"
    torch.save(trunk, path)
    model = build_network("small_eps", 7, pretrained=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trunk.items())
    assert model.fc8.weight.shape == (8, 128, 1, 1)

    torch.save(donor, tmp_path / "full.pth")  # a trained head is not an ImageNet init
    with pytest.raises(WeightsError, match="trained head"):
        load_pretrained(build_network("small_eps", 7), tmp_path / "full.pth")
    torch.save({k: v for k, v in trunk.items() if not k.startswith("stage4")}, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="exactly the head new.*Missing from the file: stage4"):
        load_pretrained(build_network("small_eps", 7), tmp_path / "short.pth")
    torch.save({**trunk, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="Not in the network: extra.weight"):
        load_pretrained(build_network("small_eps", 7), tmp_path / "extra.pth")


def test_resnet101_from_torchvision_imagenet_file(tmp_path):
    """A torchvision ImageNet state_dict (with its fc classifier) initialises the dilated trunk."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet101(weights=None).state_dict()
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(tv, path)
    del tv
    model = build_network("resnet101_eps", 20)
    result = load_pretrained(model, path)
    assert result["missing"] == ["fc8.weight"]
    reloaded = torch.load(path, weights_only=True)
    assert torch.equal(model.layer4[2].conv3.weight, reloaded["layer4.2.conv3.weight"])
    # Dilated (torchvision gives a layer's first block the previous dilation), same weights fit.
    assert model.layer4[0].conv2.dilation == (2, 2) and model.layer4[1].conv2.dilation == (4, 4)


def test_load_network_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = build_network("small_eps", 20, width=8, blocks=2)
    path = tmp_path / "checkpoint_cls.pth"
    torch.save({"model": trained.state_dict(), "iter": 1}, path)  # unrecorded: by shape
    model, found = load_network(path, 20)
    assert (found.network, model.num_classes, model.width, model.blocks) == ("small_eps", 20, 8, 2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
    custom = build_network("small_cls", 4)
    model, _ = load_network(custom.state_dict(), 4, "small_cls")
    assert model.head_type == "cls" and model.num_classes == 4
    with pytest.raises(WeightsError, match="pass --network"):
        load_network(custom.state_dict(), 4, ambiguous_ok=False)


def test_load_network_skips_the_random_init_and_loads_every_tensor(tmp_path, monkeypatch):
    # load_network builds on the meta device and loads into uninitialised memory: the result
    # must equal a normally built network loaded with the same file, frozen flags included
    from network.weights import build_for_loading
    torch.manual_seed(0)
    trained = build_network("small_eps", 20, width=8, blocks=2)
    sd = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    import network.weights as nw
    devices, real_build = [], nw.build_network

    def spy(*a, **k):  # the device a factory call lands on while the network is built
        devices.append(torch.empty(()).device.type)
        return real_build(*a, **k)

    monkeypatch.setattr(nw, "build_network", spy)
    model, _ = load_network(sd, 20, "small_eps")
    monkeypatch.setattr(nw, "build_network", real_build)
    assert devices == ["meta"]  # built once, on the meta device: no random init to overwrite
    fresh = build_network("small_eps", 20, width=8, blocks=2)
    fresh.load_state_dict(trained.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k  # num_batches_tracked: 0, as in a fresh build
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    assert model.training == fresh.training
    # a network with state that a load does not restore is built normally (initialised)

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    monkeypatch.setattr(nw, "build_network", lambda *a, **k: WithConstant())
    assert torch.equal(build_for_loading("x", 1).scale, torch.full((3,), 2.0))


def test_build_for_loading_falls_back_where_meta_cannot_build_or_keep_the_network(monkeypatch):
    """A forker's backbone must load the same as a normal build: one that reads values in
    __init__ (``.item()``, as stochastic-depth code does), one with tied weights, and one that
    keeps tensors in a list attribute are all built normally, with their values."""
    import network.weights as nw
    from network.weights import build_for_loading

    class ReadsValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rates = [x.item() for x in torch.linspace(0, 0.1, 3)]
            self.fc = torch.nn.Linear(2, 2)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2, bias=False)
            self.b = torch.nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    class ListOfTensors(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
            self.anchors = [torch.ones(2)]

    built = {}
    for cls in (ReadsValues, Tied, ListOfTensors):
        monkeypatch.setattr(nw, "build_network", lambda *a, cls=cls, **k: cls())
        built[cls.__name__] = build_for_loading("x", 1)
    assert built["ReadsValues"].rates[-1] == pytest.approx(0.1)
    assert built["Tied"].a.weight is built["Tied"].b.weight
    assert built["ListOfTensors"].anchors[0].device.type == "cpu"
    assert all(p.device.type == "cpu" for m in built.values() for p in m.parameters())
