"""network/cpu/fuse.py: the inference-only fused network (conv-BN folding + frozen TorchScript graph,
or the Winograd / pre-packed eager graph) computes the same CAMs as the eager network, at sizes
the trace never saw, leaves the original model untouched and refuses to train."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from network import build_network
from network.cpu.fuse import (FusedNetwork, PackedConv2d, fold_conv_bn, fuse_for_inference,
                          optimise_cpu_graph)
from network.cpu.winograd import WinogradConv2d

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make(name, num_classes=4, seed=0):
    torch.manual_seed(seed)
    model = build_network(name, num_classes)
    # Non-trivial eval statistics and affines, so every BN (folded or not) does something.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.7, 1.3, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def max_rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# resnet38: 15 basic blocks (conv_branch2a -> bn_branch2b1) + 2 bottlenecks (two pairs each)
# + conv1a -> b2.bn_branch2a (b2 has a projection shortcut, so conv1a's output has one user);
# small (width 16, 1 block): 8 ConvBNReLU units.
@pytest.mark.parametrize("name,folded", [("resnet38_eps", 20), ("small_cls", 8), ("small_eps", 8)])
def test_fused_network_equals_eager(name, folded):
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    assert isinstance(fused, FusedNetwork)
    assert fused.head_type == model.head_type and fused.num_classes == model.num_classes
    assert f"folded {folded} conv-BN pairs" in fused.description
    plain = fold_conv_bn(model)        # the fx-only stage (freeze=False)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        # 64x64 is the trace size; the others were never traced (scales of one image differ)
        for size in ((64, 64), (40, 88), (72, 56)):
            x = torch.randn(2, 3, *size, generator=g)
            ref = model.forward_cam(x)
            for out in (fused.forward_cam(x), plain(x)):
                assert out.shape == ref.shape
                assert max_rel_diff(out, ref) <= 1e-5
    # the original is untouched: same tensors, BN modules still there, still trainable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    assert any(p.requires_grad for p in model.parameters())


def test_fused_network_is_inference_only():
    fused = fuse_for_inference(make("small_eps"), freeze=False)
    assert not any(p.requires_grad for p in fused.parameters())
    fused.eval()   # allowed
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()


def test_fused_cams_through_the_infer_arithmetic():
    """Softmax + normalisation of the fused CAMs stay within the infer tolerance (1e-5)."""
    from network import cam as camlib
    model = make("small_eps", num_classes=3, seed=2)
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 48, 60, generator=torch.Generator().manual_seed(3))
    label = torch.tensor([1.0, 0.0, 1.0])
    keys = camlib.present_classes(label)
    with torch.inference_mode():
        a = camlib.combine_flip_pair(model.forward_cam(x), (48, 60), keys, label, "eps")[0]
        b = camlib.combine_flip_pair(fused.forward_cam(x), (48, 60), keys, label, "eps")[0]
    assert (camlib.normalize_cams(a) - camlib.normalize_cams(b)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------
# winograd=True: the eager CPU graph of optimise_cpu_graph (Winograd + pre-packed convs)
# ------------------------------------------------------------------------------------------
# resnet38: 24 3x3 stride-1 convs with >= 256 inputs (b3.conv_branch2b1 .. b7) as Winograd, the
# other 20 convs (conv1a, b2*, the strided and 1x1 ones, fc8) pre-packed; small nets: the 5 3x3
# stride-1 convs as Winograd when the channel floor is 0, none above their width.
@pytest.mark.parametrize("name,min_channels,n_wino", [("resnet38_eps", None, 24),
                                                      ("small_cls", 0, 5), ("small_eps", 0, 5),
                                                      ("small_eps", 10**6, 0)])
def test_winograd_network_equals_eager(name, min_channels, n_wino):
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model, winograd=True, min_winograd_channels=min_channels)
    assert f"{n_wino} convs as Winograd" in fused.description
    assert fused.head_type == model.head_type and fused.num_classes == model.num_classes
    n_wino_modules = sum(isinstance(m, WinogradConv2d) for m in fused.modules())
    assert n_wino_modules == n_wino
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for size in ((64, 64), (40, 88), (21, 30)):
            x = torch.randn(2, 3, *size, generator=g)
            ref = model.forward_cam(x)
            for fmt in (torch.contiguous_format, torch.channels_last):
                out = fused.forward_cam(x.contiguous(memory_format=fmt))
                assert out.shape == ref.shape
                assert max_rel_diff(out, ref) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()


def test_winograd_graph_leaves_the_input_alone():
    model = make("small_eps")
    fused = fuse_for_inference(model, winograd=True, min_winograd_channels=0)
    x = torch.randn(1, 3, 33, 47).contiguous(memory_format=torch.channels_last)
    keep = x.clone()
    with torch.inference_mode():
        a, b = fused.forward_cam(x), fused.forward_cam(x)
    assert torch.equal(x, keep) and torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=1), dict(kernel_size=1, stride=2),
                                    dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=3, padding=2, dilation=2)])
@pytest.mark.parametrize("relu", [False, True])
def test_packed_conv_equals_conv(kwargs, relu):
    torch.manual_seed(0)
    c = torch.nn.Conv2d(12, 20, bias=relu, **kwargs).eval()
    p = PackedConv2d(c, relu=relu)
    with torch.inference_mode():
        # sizes other than any packing hint: the packed weight works for every input size
        for size in ((17, 23), (5, 4), (40, 33)):
            x = torch.randn(2, 12, *size)
            ref = c(x).relu() if relu else c(x)
            for fmt in (torch.contiguous_format, torch.channels_last):
                y = p(x.contiguous(memory_format=fmt))
                assert y.shape == ref.shape and max_rel_diff(y, ref) <= 1e-5


def test_optimise_cpu_graph_counts():
    """small_eps: 8 conv-BN-ReLU units (ReLU fused into each conv) + fc8; without Winograd all 9
    are pre-packed, with no channel floor the 5 3x3 stride-1 ones become Winograd. The CAM head's
    fc8 is a module call (eps); the cls head calls F.conv2d on its weight and keeps it."""
    gm = fold_conv_bn(make("small_eps"))
    assert optimise_cpu_graph(gm, None) == {"winograd": 0, "packed": 9, "fused_relu": 8, "inplace": 0}
    gm = fold_conv_bn(make("small_eps"))
    assert optimise_cpu_graph(gm, 0) == {"winograd": 5, "packed": 4, "fused_relu": 8, "inplace": 0}


def test_without_onednn_ops_the_graph_still_matches(monkeypatch):
    """A torch without the private oneDNN ops: no pre-packed convs, Winograd products through
    torch.mm; same CAMs."""
    import network.cpu.onednn
    monkeypatch.setattr(network.cpu.onednn, "available", lambda: False)
    model = make("small_eps")
    fused = fuse_for_inference(model, winograd=True, min_winograd_channels=0)
    assert "0 pre-packed" in fused.description
    assert not any(isinstance(m, PackedConv2d) for m in fused.modules())
    assert all(not m.products.use_onednn for m in fused.modules() if isinstance(m, WinogradConv2d))
    x = torch.randn(1, 3, 40, 52)
    with torch.inference_mode():
        assert max_rel_diff(fused.forward_cam(x), model.forward_cam(x)) <= 1e-5


def test_in_place_rewrites_never_touch_shared_tensors():
    """A ReLU after an eval Dropout (which passes its input through) must not run in place when
    that input has other users, and a conv output used twice is not accumulated into."""
    import torch.fx as fx
    import torch.nn.functional as F

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.drop = torch.nn.Dropout2d(0.5)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = F.relu(self.drop(y))          # drop(y) is y itself in eval mode
            w = F.relu(self.bn(z))            # bn output: fresh, single user -> in place is fine
            return y + z + w

    torch.manual_seed(0)
    toy = Toy().eval()
    gm = fx.symbolic_trace(copy.deepcopy(toy))
    counts = optimise_cpu_graph(gm, 0)
    assert counts["fused_relu"] == 0 and counts["inplace"] == 1   # only relu(bn(.))
    x = torch.randn(2, 3, 9, 11)
    with torch.inference_mode():
        assert max_rel_diff(gm(x), toy(x)) <= 1e-6


@pytest.mark.parametrize("winograd", [False, True])
def test_building_leaves_the_models_mode_alone(winograd):
    model = make("small_eps").train()
    fuse_for_inference(model, winograd=winograd, min_winograd_channels=0)
    assert model.training



def _thp_always() -> bool:
    try:  # with transparent huge pages always on, a 40 MB block faults in as ~20 huge pages
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': page-fault counts "
                                          "do not measure the reuse")
def test_keep_freed_memory_reuses_large_blocks_with_fewer_page_faults():
    # 40 MB blocks allocated and freed 10 times: by default each is a fresh mmap that faults in
    # all its pages (102,400 faults); kept in the heap, part of them are reused (measured
    # 60-72k: torch's aligned allocations fragment the heap, network/cpu/memory.py)
    code = """
import resource, sys, torch
from network.cpu.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(40, 1024, 256)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.split()[-1])
    assert faults["default"] > 90_000 and faults["keep"] < 0.85 * faults["default"], faults
