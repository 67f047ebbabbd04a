"""network/cpu/winograd.py: Winograd F(2x2, 3x3) equals the direct convolution (exactly up to float64
rounding with the torch.mm products; within fp32 rounding with the oneDNN ones) for every shape
infer.py can feed it: odd sizes, maps smaller than a tile, dilations 1/2/4, batches, bias, ReLU,
either memory format, and buffers reused across sizes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from network.cpu import winograd as wg
from network.cpu.winograd import WinogradConv2d, is_eligible, transform_weight


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def conv(cin, cout, dilation=1, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    c = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias).to(dtype)
    return c.eval()


def direct(c, x, relu):
    y = F.conv2d(x, c.weight, c.bias, padding=c.padding, dilation=c.dilation)
    return y.relu() if relu else y


def test_weight_transform_by_hand():
    # g = centre tap only: (G g G^T)[i, j] = G[i, 1] G[j, 1], G[:, 1] = (0, 1/2, -1/2, 0)
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 1] = 1.0
    u = transform_weight(w).view(4, 4)
    col = torch.tensor([0.0, 0.5, -0.5, 0.0])
    assert torch.equal(u, torch.outer(col, col))
    # g = all ones: G @ 1 = (1, 3/2, 1/2, 1)
    row = torch.tensor([1.0, 1.5, 0.5, 1.0])
    assert torch.equal(transform_weight(torch.ones(1, 1, 3, 3)).view(4, 4), torch.outer(row, row))
    # layout (16, Co, C): component-major, output channel, input channel
    assert transform_weight(torch.randn(5, 7, 3, 3)).shape == (16, 5, 7)
    with pytest.raises(ValueError, match="3, 3"):
        transform_weight(torch.randn(5, 7, 1, 1))


def test_weight_transform_is_g_g_gt_per_channel_pair(monkeypatch):
    # the chunked (G kron G) product equals G g G^T for every (o, c), across chunk borders
    import network.cpu.winograd as wg
    monkeypatch.setattr(wg, "_TRANSFORM_CHUNK", 4)
    w = torch.randn(3, 5, 3, 3)
    g = torch.tensor(wg._G, dtype=torch.float64)
    want = torch.stack([torch.stack([(g @ w[o, c].double() @ g.t()).float().flatten()
                                     for c in range(5)], 1) for o in range(3)], 1)
    assert torch.equal(transform_weight(w), want)


@pytest.mark.parametrize("shape,dilation", [
    ((1, 8, 7, 9), 1), ((2, 6, 10, 13), 2), ((1, 4, 5, 3), 4), ((1, 3, 1, 1), 1),
    ((1, 5, 2, 17), 2), ((2, 9, 12, 12), 4), ((1, 16, 47, 63), 1)])
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
def test_equals_direct_convolution_float64(shape, dilation, bias, relu):
    """float64 with the torch.mm products: Winograd is exact algebra, so 1e-12 agreement."""
    c = conv(shape[1], 11, dilation, bias, torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    w = WinogradConv2d(c, relu=relu, use_onednn=False)
    with torch.inference_mode():
        for fmt in (torch.contiguous_format, torch.channels_last):
            y = w(x.contiguous(memory_format=fmt))
            ref = direct(c, x, relu)
            assert y.shape == ref.shape
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert (y - ref).abs().max() <= 1e-12 * ref.abs().max().clamp_min(1)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_float32_within_rounding(onednn, dilation):
    """fp32: Winograd's rounding error stays within a few times the direct conv's own (both
    against a float64 reference), ~1e-6 of the output's magnitude."""
    c = conv(256, 32, dilation)
    x = torch.randn(1, 256, 23, 30).relu()   # post-ReLU activations, as in the network
    w = WinogradConv2d(c, use_onednn=onednn)
    c64 = conv(256, 32, dilation, dtype=torch.float64)
    with torch.inference_mode():
        ref = direct(c64, x.double(), False)
        scale = ref.abs().max()
        err_wino = float((w(x).double() - ref).abs().max() / scale)
        err_direct = float((direct(c, x, False).double() - ref).abs().max() / scale)
    assert err_wino <= 4e-6
    assert err_wino <= 10 * max(err_direct, 1e-7)


def test_workspace_reused_across_sizes():
    """The buffers grow to the largest call and are sliced for smaller ones: alternating sizes
    and dilations (as the layers and scales of one image do) never mix data up."""
    wg.clear_workspace()
    layers = [(conv(8, 8, d, seed=d), d) for d in (1, 2, 4)]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for h, w in ((30, 41), (7, 5), (30, 41), (13, 2), (64, 64), (3, 3)):
            for c, d in layers:
                x = torch.randn(1, 8, h, w, generator=g)
                ref = direct(c, x, False)
                y = WinogradConv2d(c)(x)
                assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    wg.clear_workspace()


def test_bias_rides_on_component_5():
    """A bias alone (zero weights) comes out exactly: it enters the products once, on (1, 1)."""
    c = conv(4, 3)
    with torch.no_grad():
        c.weight.zero_()
        c.bias.copy_(torch.tensor([0.5, -2.0, 3.25]))
    y = WinogradConv2d(c, use_onednn=False)(torch.randn(1, 4, 5, 6))
    assert torch.equal(y, c.bias.view(1, 3, 1, 1).expand(1, 3, 5, 6))


def test_eligibility_and_refusals():
    assert is_eligible(nn.Conv2d(4, 4, 3, padding=1))
    assert is_eligible(nn.Conv2d(4, 4, 3, padding=4, dilation=4))
    assert not is_eligible(nn.Conv2d(4, 4, 3, padding=1), min_channels=8)
    for bad in (nn.Conv2d(4, 4, 3, stride=2, padding=1),       # strided
                nn.Conv2d(4, 4, 3, padding=2, dilation=1),     # padding != dilation
                nn.Conv2d(4, 4, 3, padding=0),                  # 'valid'
                nn.Conv2d(4, 4, 3, padding=1, groups=2),        # grouped
                nn.Conv2d(4, 4, 1),                             # 1x1
                nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                nn.BatchNorm2d(4)):
        assert not is_eligible(bad)
    with pytest.raises(ValueError, match="not a 3x3"):
        WinogradConv2d(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    w = WinogradConv2d(conv(4, 4))
    w.eval()
    with pytest.raises(RuntimeError, match="inference-only"):
        w.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        w(torch.randn(1, 4, 5, 5, requires_grad=True))


def test_workspace_works_in_and_out_of_inference_mode():
    """Buffers first made under inference_mode are still writable under no_grad (fuse.py checks
    its graph under no_grad, infer.py runs it under inference_mode)."""
    wg.clear_workspace()
    c = conv(4, 4)
    w = WinogradConv2d(c)
    x = torch.randn(1, 4, 9, 9)
    with torch.inference_mode():
        a = w(x)
    with torch.no_grad():
        b = w(x)
    assert torch.equal(a, b)
