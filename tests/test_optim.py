"""Optimizer: published parameter groups, momentum trap and per-step poly decay
(EPS util/torchutils.py PolyOptimizer, module/optimizer.py get_optimizer)."""
import pytest
import torch

from utils.optim import (PUBLISHED_MOMENTUM, build_adamw, build_optimizer, poly_lr, set_poly_lr,
                         warmup_poly_lr)


def test_poly_lr_values():
    assert poly_lr(0, 0.01, 100) == 0.01
    assert poly_lr(50, 0.01, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    last = poly_lr(99, 0.01, 100)
    assert last == pytest.approx(0.01 * 0.01 ** 0.9) and last > 0
    # Past max_step the published optimizer stops updating: the lr stays at the last value.
    assert poly_lr(100, 0.01, 100) == last and poly_lr(1000, 0.01, 100) == last
    assert poly_lr(10, 1.0, 20, power=1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        poly_lr(0, 0.01, 0)


class _Tiny(torch.nn.Module):
    """Stand-in with the published grouping: conv weights 1x, biases 2x, head weight 10x, head bias 20x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Conv2d(3, 4, 1, bias=False)
        self.body = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc8 = torch.nn.Conv2d(4, 2, 1)
        self.frozen.weight.requires_grad = False  # like conv1a / b2*: in group 0, never updated

    def forward(self, x):
        return self.fc8(torch.relu(self.body(self.frozen(x)))).mean((2, 3))

    def get_parameter_groups(self):
        return [{"name": "1x", "params": [self.frozen.weight, self.body.weight], "lr_mult": 1,
                 "weight_decay_mult": 1},
                {"name": "2x", "params": [self.body.bias], "lr_mult": 2, "weight_decay_mult": 0},
                {"name": "10x", "params": [self.fc8.weight], "lr_mult": 10, "weight_decay_mult": 1},
                {"name": "20x", "params": [self.fc8.bias], "lr_mult": 20, "weight_decay_mult": 0}]


def test_groups_and_published_momentum():
    m = _Tiny()
    opt = build_optimizer(m.get_parameter_groups(), lr=0.01, weight_decay=5e-4)
    assert [g["name"] for g in opt.param_groups] == ["1x", "2x", "10x", "20x"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert all(g["momentum"] == PUBLISHED_MOMENTUM == 5e-4 for g in opt.param_groups)
    assert all(g["dampening"] == 0 and not g["nesterov"] for g in opt.param_groups)
    opt = build_optimizer(m.get_parameter_groups(), lr=0.01, weight_decay=5e-4, momentum=0.9)
    assert opt.param_groups[0]["momentum"] == 0.9


class _PublishedPoly(torch.optim.SGD):
    """The published optimizer's behaviour, written out: weight decay passed positionally (so it
    lands in SGD's momentum slot), lr = init * (1 - t/T)^power set before each step."""

    def __init__(self, params, lr, weight_decay, max_step, power=0.9):
        super().__init__(params, lr, weight_decay)
        self.global_step, self.max_step, self.power = 0, max_step, power
        self.init_lr = [g["lr"] for g in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            f = (1 - self.global_step / self.max_step) ** self.power
            for g, lr0 in zip(self.param_groups, self.init_lr):
                g["lr"] = lr0 * f
        super().step(closure)
        self.global_step += 1


def _published_groups(m, lr, wd):
    g = m.get_parameter_groups()
    return [{"params": g[0]["params"], "lr": lr, "weight_decay": wd},
            {"params": g[1]["params"], "lr": 2 * lr, "weight_decay": 0},
            {"params": g[2]["params"], "lr": 10 * lr, "weight_decay": wd},
            {"params": g[3]["params"], "lr": 20 * lr, "weight_decay": 0}]


def test_matches_published_optimizer_step_by_step():
    steps, lr, wd = 7, 0.05, 5e-4
    a, b = _Tiny(), _Tiny()
    opt_a = build_optimizer(a.get_parameter_groups(), lr=lr, weight_decay=wd)
    opt_b = _PublishedPoly(_published_groups(b, lr, wd), lr=lr, weight_decay=wd, max_step=steps)
    assert opt_b.param_groups[0]["momentum"] == wd  # the trap, reproduced
    frozen0 = a.frozen.weight.detach().clone()
    torch.manual_seed(1)
    data = [(torch.randn(2, 3, 5, 5), torch.randint(0, 2, (2, 2)).float()) for _ in range(steps)]
    lrs = []
    for t, (x, y) in enumerate(data):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.multilabel_soft_margin_loss(m(x), y).backward()
        lrs.append(set_poly_lr(opt_a, t, steps))
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    assert lrs == pytest.approx([lr * (1 - t / steps) ** 0.9 for t in range(steps)])
    # Frozen weights (grad None) get neither updates nor weight decay.
    assert torch.equal(a.frozen.weight, frozen0)


def test_sgd_update_formula():
    # d = g + wd w; buf = d on the first step, then m buf + d; w -= lr buf.
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer([{"name": "1x", "params": [w], "lr_mult": 1, "weight_decay_mult": 1}],
                          lr=0.1, weight_decay=0.01, momentum=0.5)
    g1, g2 = torch.tensor([0.5, 0.25]), torch.tensor([-1.0, 2.0])
    w.grad = g1.clone()
    opt.step()
    d1 = g1 + 0.01 * torch.tensor([1.0, -2.0])
    w1 = torch.tensor([1.0, -2.0]) - 0.1 * d1
    torch.testing.assert_close(w.detach(), w1)
    w.grad = g2.clone()
    opt.step()
    buf = 0.5 * d1 + g2 + 0.01 * w1
    torch.testing.assert_close(w.detach(), w1 - 0.1 * buf)


def test_empty_model_is_an_error():
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([{"name": "1x", "params": []}], lr=0.01, weight_decay=5e-4)


def test_fused_by_default_and_same_result_as_unfused():
    a, b = _Tiny(), _Tiny()
    opt_a = build_optimizer(a.get_parameter_groups(), lr=0.05, weight_decay=5e-4)
    opt_b = build_optimizer(b.get_parameter_groups(), lr=0.05, weight_decay=5e-4, fused=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    torch.manual_seed(2)
    for t in range(4):
        x, y = torch.randn(2, 3, 5, 5), torch.randint(0, 2, (2, 2)).float()
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.multilabel_soft_margin_loss(m(x), y).backward()
            set_poly_lr(opt, t, 4)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)


def test_warmup_then_poly():
    """ToCo utils/optimizer.py PolyWarmupAdamW: linear from ratio x lr to lr over the warmup, then
    the poly value of the same step; without a warmup exactly the published poly_lr."""
    base, n = 6e-5, 20000
    assert warmup_poly_lr(0, base, n, warmup_iters=1500, warmup_ratio=1e-6) == pytest.approx(6e-11)
    assert warmup_poly_lr(750, base, n, warmup_iters=1500, warmup_ratio=1e-6) == \
        pytest.approx(base * (1 - 0.5 * (1 - 1e-6)))
    assert warmup_poly_lr(1500, base, n, warmup_iters=1500, warmup_ratio=1e-6) == poly_lr(1500, base, n)
    for step in (0, 1, 7, 19999, 25000):
        assert warmup_poly_lr(step, 0.01, n) == poly_lr(step, 0.01, n)  # bit for bit


def test_adamw_groups():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = build_adamw([dict(name="layer1", params=[w], lr_mult=0.5, weight_decay_mult=1),
                       dict(name="layer1_no_decay", params=[b], lr_mult=0.5, weight_decay_mult=0)],
                      lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["lr"], g["base_lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("layer1", 5e-4, 5e-4, 0.05), ("layer1_no_decay", 5e-4, 5e-4, 0.0)]
    assert set_poly_lr(opt, 0, 10, warmup_iters=2, warmup_ratio=0.0) == 0.0
