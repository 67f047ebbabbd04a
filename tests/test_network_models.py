"""Every registered network: forward/backward shapes and finiteness, the published freezing
(frozen layers and BN really do not change in an optimizer step), the head semantics, the
parameter groups, and activation checkpointing (identical outputs and gradients).

Inputs are tiny (32 px): ResNet-38 is 105 M parameters, so each test builds at most one network."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from network import NETWORKS, build_network, normalize_network_name

C = 3  # foreground classes: small heads keep the tests light
FROZEN_PREFIXES = {"resnet38": ("conv1a.", "b2.", "b2_1.", "b2_2."),
                   "resnet101": ("conv1.", "bn1.", "layer1."),
                   "small": ()}


def bn_keys(model):
    """State-dict keys (parameters and buffers) that belong to BN layers."""
    names = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    return {k for k in model.state_dict() if k.rsplit(".", 1)[0] in names}


def expected_frozen(model):
    """Keys that must not change in training, from the published rules (not from the model's
    own bookkeeping): the early layers and every BN entry, when BN is frozen."""
    if not model.freeze_bn:
        return set()
    early = {k for k in model.state_dict() if k.startswith(FROZEN_PREFIXES[model.arch])}
    return early | bn_keys(model)


def calibrate_bn(model, x):
    """Give frozen BN layers batch statistics, as ImageNet weights would: with the initial
    (0, 1) statistics a 100-layer ResNet's activations explode and one SGD step gives NaNs."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.train()
        m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.forward_features(x)
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()
    model.train()  # re-applies the freezing (BN back to eval)


def sgd_for(model, lr=1e-4, wd=1e-2):
    groups = model.get_parameter_groups()
    return torch.optim.SGD([dict(params=g["params"], lr=lr * g["lr_mult"],
                                 weight_decay=wd * g["weight_decay_mult"]) for g in groups],
                           lr=lr)  # no momentum buffers: 420 MB less for ResNet-38


def loss_of(model, out):
    """A loss that reaches every parameter, whatever the head returns (a tensor or a tuple)."""
    return sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))


def test_normalize_network_name():
    assert normalize_network_name("network.resnet38_eps") == "resnet38_eps"
    assert normalize_network_name("resnet38-cls") == "resnet38_cls"
    with pytest.raises(KeyError, match="choose one of"):
        normalize_network_name("network.resnet50_eps")


def test_freeze_bn_defaults():
    with torch.device("meta"):
        assert build_network("resnet38_eps", C).freeze_bn is True
        assert build_network("small_eps", C).freeze_bn is False
        assert build_network("small_eps", C, freeze_bn=True).freeze_bn is True
        net = build_network("small_cls", C, width=4, blocks=0, output_stride=4)
    assert net.feature_channels == 32 and net.fc8.weight.shape == (C, 32, 1, 1)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_train_step_shapes_and_freezing(name):
    torch.manual_seed(0)
    model = build_network(name, C)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    if model.freeze_bn:
        calibrate_bn(model, x)
    optimizer = sgd_for(model)  # weight decay: every trainable tensor must move
    before = {k: v.clone() for k, v in model.state_dict().items()}

    out = model(x)
    s = -(-32 // model.output_stride)  # the feature map of a 32-px input: 4 at OS 8, 2 at OS 16
    if model.head_type == "eps":
        pred, cam = out
        assert pred.shape == (2, C + 1) and cam.shape == (2, C + 1, s, s)
    elif model.head_type == "cls":
        assert out.shape == (2, C)
    assert all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))
    loss_of(model, out).backward()

    frozen = expected_frozen(model)
    assert set(model.frozen_parameter_names()) == {k for k in frozen if k in dict(model.named_parameters())}
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    optimizer.step()

    after = model.state_dict()
    for k, v in after.items():
        if k in frozen:
            assert torch.equal(v, before[k]), f"{k} changed although frozen"
        elif k in dict(model.named_parameters()):
            assert not torch.equal(v, before[k]), f"{k} did not train"
    if model.freeze_bn:
        assert all(int(after[k]) == 0 for k in after if k.endswith("num_batches_tracked"))
    elif bn_keys(model):  # BN trains from scratch: statistics move (a ViT has no BN)
        assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("running_mean"))

    # Eval-mode CAMs: out_channels(C) maps for any head; then the published heads' semantics:
    # cls → ReLU CAMs with C channels, eps → raw CAMs with C+1 channels.
    model.eval()
    with torch.no_grad():
        cam = model.forward_cam(x)
        feats = model.forward_features(x)
    assert cam.shape == (2, model.out_channels(C), s, s)
    assert feats.shape == (2, model.feature_channels, s, s)
    if model.head_type not in ("cls", "eps"):
        return
    raw = F.conv2d(feats, model.fc8.weight)
    if model.head_type == "eps":
        assert cam.shape == (2, C + 1, s, s)
        torch.testing.assert_close(cam, raw)
        pred2, cam2 = model(x)
        torch.testing.assert_close(cam2, raw)
        torch.testing.assert_close(pred2, raw.mean(dim=(2, 3)))  # fc8 first, then GAP
    else:
        assert cam.shape == (2, C, s, s) and (cam >= 0).all()
        torch.testing.assert_close(cam, raw.clamp(min=0))
        # GAP then fc8 (published order) equals the spatial mean of the raw CAM (linearity).
        torch.testing.assert_close(model(x), raw.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_train_override_modes():
    model = build_network("small_cls", C, freeze_bn=True)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert model.train() is model
    assert model.training and model.dropout7.training
    assert all(not m.training and not m.weight.requires_grad for m in bns)
    model.eval()
    assert not model.training and all(not m.training for m in bns)
    model.train(True)
    assert all(not m.training for m in bns)  # stays frozen through every train() call

    free = build_network("small_cls", C, freeze_bn=False).train()
    assert all(m.training for m in free.modules() if isinstance(m, _BatchNorm))
    assert all(p.requires_grad for p in free.parameters())


def test_parameter_groups_published_resnet38():
    with torch.device("meta"):
        model = build_network("resnet38_eps", 20)
    groups = model.get_parameter_groups()
    assert [(g["name"], g["lr_mult"], g["weight_decay_mult"]) for g in groups] == [
        ("1x", 1, 1), ("2x", 2, 0), ("10x", 10, 1), ("20x", 20, 0)]
    names = {id(p): n for n, p in model.named_parameters()}
    g = {grp["name"]: [names[id(p)] for p in grp["params"]] for grp in groups}
    conv_weights = [n for n, p in model.named_parameters() if p.dim() == 4 and n != "fc8.weight"]
    assert g["1x"] == conv_weights and len(conv_weights) == 43
    assert "conv1a.weight" in g["1x"] and "b2.conv_branch1.weight" in g["1x"]  # frozen, but in g0
    assert g["10x"] == ["fc8.weight"] and g["2x"] == [] and g["20x"] == []
    assert not any(".bn" in n or n.startswith("bn7") for n in sum(g.values(), []))


def test_parameter_groups_trained_bn():
    model = build_network("small_eps", C)
    groups = {g["name"]: g["params"] for g in model.get_parameter_groups()}
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert all(any(m.weight is p for p in groups["1x"]) for m in bns)
    assert all(any(m.bias is p for p in groups["2x"]) for m in bns)
    grouped = [p for ps in groups.values() for p in ps]
    assert len(grouped) == len(list(model.parameters()))
    assert groups["10x"] == [model.fc8.weight]


@pytest.mark.parametrize("name", ["small_eps", pytest.param("resnet38_cls", marks=pytest.mark.slow),
                                  pytest.param("resnet101_eps", marks=pytest.mark.slow),
                                  "vit_small_eps"])
def test_checkpointing_gives_identical_results(name):
    """Same outputs, gradients and BN statistics with and without activation checkpointing,
    dropout included (checkpoint replays the RNG state) and with training-mode BN (the
    recomputation must not update the running statistics twice)."""
    torch.manual_seed(0)
    model = build_network(name, C).train()
    # Only buffers change without an optimizer step; keep them (not the 420 MB of weights).
    start = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(2, 3, 32, 32)
    # The first conv of one checkpointed block: its forward hook fires again in the recomputation
    # (the block's own hook does not: recomputation stops early once the saved tensors are back).
    layer = {"small": "stage3.0.conv", "resnet38": "b6.conv_branch2a", "resnet101": "layer3.0.conv1",
             "vit_small": "blocks.3.attn.qkv"}
    calls = []
    model.get_submodule(layer[model.arch]).register_forward_hook(lambda *a: calls.append(1))

    def run(checkpointing):
        model.load_state_dict(start, strict=False)
        model.zero_grad(set_to_none=True)
        model.checkpointing = checkpointing
        calls.clear()
        torch.manual_seed(123)  # same dropout masks in both runs
        out = model(x)
        loss_of(model, out).backward()
        return [o.detach() for o in (out if isinstance(out, tuple) else (out,))], len(calls)

    outs, n_calls = run(False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    assert n_calls == 1 and len(grads) > 0
    outs_ckpt, n_calls = run(True)
    assert n_calls == 2  # the checkpointed block really was recomputed in backward
    for a, b in zip(outs, outs_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == grads.keys()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7)
    for k, v in model.named_buffers():  # BN running stats and num_batches_tracked: one update only
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)


def test_no_checkpointing_without_grad():
    model = build_network("small_eps", C, checkpointing=True).eval()
    with torch.no_grad():
        pred, cam = model(torch.randn(1, 3, 32, 32))
    assert pred.shape == (1, C + 1) and not cam.requires_grad
