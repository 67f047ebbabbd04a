"""Golden values: fixed weights (from numpy's seeded generator, independent of torch's init) and a
fixed input give stored outputs (tests/data/network_golden.npz), compared with allclose. Catches
silent numeric changes in the trunks and heads.

The ResNet-38 outputs are also checked against an independent functional implementation written
from psa network/resnet38d.py (docs/networks.md): pre-activation blocks, shortcut from the BN-ReLU'd
input (projection) or the raw input (identity), dilations, bn7 + ReLU, fc8 then GAP.

Regenerate (only after an intended change, and say why in the commit):
    EPS_REGEN_GOLDEN=1 python -m pytest -q tests/test_network_golden.py
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from network import build_network

GOLDEN = Path(__file__).parent / "data" / "network_golden.npz"
REGEN = os.environ.get("EPS_REGEN_GOLDEN") == "1"
_results = {}


def fill_deterministic(model, seed):
    """Every parameter and BN statistic from numpy's PCG64 stream (stable across versions and
    machines), scaled so the activations stay O(1)-O(100) through the depth."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.dim() == 4:  # conv: unit variance per output
                v = rng.standard_normal(t.shape, dtype=np.float32) / np.sqrt(np.prod(t.shape[1:]))
            elif name.endswith("running_var") or name.endswith("weight"):
                v = rng.uniform(0.5, 1.5, t.shape).astype(np.float32)
            else:  # running_mean, BN bias
                v = (0.1 * rng.standard_normal(t.shape)).astype(np.float32)
            t.copy_(torch.from_numpy(v))


def fixed_input(shape, seed=7):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def check_golden(key, value):
    value = value.detach().numpy()
    _results[key] = value
    if REGEN:
        return  # recorded; written by teardown_module
    stored = np.load(GOLDEN)[key]
    scale = float(np.abs(stored).max())
    np.testing.assert_allclose(value, stored, rtol=1e-4, atol=1e-5 * max(scale, 1.0), err_msg=key)


def teardown_module(module):
    if REGEN and _results:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        np.savez(GOLDEN, **_results)


# ------------------------------------------------------------------------------------------------
# an independent ResNet-38d forward, written from psa network/resnet38d.py Net (eval mode)
# ------------------------------------------------------------------------------------------------
def reference_resnet38_eps(sd, x):
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], training=False, eps=1e-5)

    def block(t, n, stride=1, first_dilation=1, dilation=1):
        a = F.relu(bn(t, n + ".bn_branch2a"))
        w1 = sd.get(n + ".conv_branch1.weight")
        shortcut = F.conv2d(a, w1, stride=stride) if w1 is not None else t
        y = F.conv2d(a, sd[n + ".conv_branch2a.weight"], stride=stride, padding=first_dilation,
                     dilation=first_dilation)
        y = F.relu(bn(y, n + ".bn_branch2b1"))
        y = F.conv2d(y, sd[n + ".conv_branch2b1.weight"], padding=dilation, dilation=dilation)
        return shortcut + y, a

    def bottleneck(t, n, dilation):
        a = F.relu(bn(t, n + ".bn_branch2a"))
        shortcut = F.conv2d(a, sd[n + ".conv_branch1.weight"])
        y = F.relu(bn(F.conv2d(a, sd[n + ".conv_branch2a.weight"]), n + ".bn_branch2b1"))
        y = F.conv2d(y, sd[n + ".conv_branch2b1.weight"], padding=dilation, dilation=dilation)
        y = F.relu(bn(y, n + ".bn_branch2b2"))  # dropout is identity in eval mode
        return shortcut + F.conv2d(y, sd[n + ".conv_branch2b2.weight"]), a

    t = F.conv2d(x, sd["conv1a.weight"], padding=1)
    for n, s in [("b2", 2), ("b2_1", 1), ("b2_2", 1), ("b3", 2), ("b3_1", 1), ("b3_2", 1), ("b4", 2)] + \
            [(f"b4_{i}", 1) for i in range(1, 6)]:
        t, _ = block(t, n, stride=s)
    t, conv4 = block(t, "b5", first_dilation=1, dilation=2)
    t, _ = block(t, "b5_1", first_dilation=2, dilation=2)
    t, _ = block(t, "b5_2", first_dilation=2, dilation=2)
    t, conv5 = bottleneck(t, "b6", 4)
    t, _ = bottleneck(t, "b7", 4)
    conv6 = F.relu(bn(t, "bn7"))
    cam = F.conv2d(conv6, sd["fc8.weight"])
    return cam.mean(dim=(2, 3)), cam, conv4, conv5


def test_resnet38_eps_golden_and_reference():
    torch.manual_seed(0)
    model = build_network("resnet38_eps", 20).eval()
    fill_deterministic(model, seed=38)
    x = fixed_input((1, 3, 32, 32))
    with torch.no_grad():
        pred, cam = model(x)
        feats = model.forward_as_dict(x)
        ref_pred, ref_cam, ref_conv4, ref_conv5 = reference_resnet38_eps(model.state_dict(), x)
    scale = float(ref_cam.abs().max())
    torch.testing.assert_close(cam, ref_cam, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(feats["conv4"], ref_conv4, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats["conv5"], ref_conv5, rtol=1e-4, atol=1e-4)
    check_golden("resnet38_eps_pred", pred[0])
    check_golden("resnet38_eps_cam", cam[0])


@pytest.mark.parametrize("name", ["small_eps", "small_cls"])
def test_small_golden(name):
    model = build_network(name, 5).eval()
    fill_deterministic(model, seed=11)
    x = fixed_input((2, 3, 48, 48))
    with torch.no_grad():
        out = model(x)
        cam = model.forward_cam(x)
    if model.head_type == "eps":
        check_golden(f"{name}_pred", out[0])
    else:
        check_golden(f"{name}_logits", out)
    check_golden(f"{name}_cam", cam[1])
