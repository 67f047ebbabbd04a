"""SGD with the published parameter groups and poly learning-rate decay (EPS util/torchutils.py
PolyOptimizer, module/optimizer.py get_optimizer; docs/training.md), and AdamW with an optional
linear warmup for the backbones that declare it (network/base.py OptimizerRecipe, network/vit.py).

The published ``PolyOptimizer`` called ``SGD.__init__(params, lr, weight_decay)``: the third
positional parameter of SGD is *momentum*, so the published runs used momentum = wt_dec = 5e-4
(practically plain SGD) and its ``momentum=0.9`` argument was only the poly power. We write the
call with keyword arguments and keep momentum 5e-4 as the default because it produced the
published numbers (``--momentum`` changes it).
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

# Effective SGD momentum of the published runs (their weight decay, passed positionally).
PUBLISHED_MOMENTUM = 5e-4
POLY_POWER = 0.9


def poly_lr(step: int, base_lr: float, max_step: int, power: float = POLY_POWER) -> float:
    """Learning rate of 0-based step ``step``: base_lr * (1 - step / max_step) ** power.

    1. The first step uses base_lr; the last one (max_step - 1) still has lr > 0.
    2. The published optimizer stops updating once step >= max_step, so the lr stays at the value
       of step max_step - 1 (only reachable when training past max_iters)."""
    if max_step <= 0:
        raise ValueError(f"max_step must be positive, got {max_step}")
    step = min(max(int(step), 0), max_step - 1)
    return base_lr * (1.0 - step / max_step) ** power


def warmup_poly_lr(step: int, base_lr: float, max_step: int, power: float = POLY_POWER,
                   warmup_iters: int = 0, warmup_ratio: float = 0.0) -> float:
    """:func:`poly_lr` after ``warmup_iters`` steps of linear warmup from ``warmup_ratio`` x
    base_lr (ToCo utils/optimizer.py PolyWarmupAdamW: lr = base * (1 - (1 - step / warmup) *
    (1 - ratio)) during the warmup, the poly value of the same step afterwards). No warmup: the
    poly value, bit for bit."""
    if warmup_iters > 0 and step < warmup_iters:
        return base_lr * (1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio))
    return poly_lr(step, base_lr, max_step, power)


def _named_groups(param_groups: Iterable[dict], lr: float, weight_decay: float) -> List[dict]:
    groups: List[dict] = []
    for g in param_groups:
        params = [p for p in g["params"]]
        base = lr * g.get("lr_mult", 1)
        groups.append({"params": params, "name": g.get("name", str(len(groups))),
                       "lr": base, "base_lr": base,
                       "weight_decay": weight_decay * g.get("weight_decay_mult", 1)})
    if not any(g["params"] for g in groups):
        raise ValueError("the model returned no parameters to optimize")
    return groups


def _fused_ok(groups: List[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(param_groups: Iterable[dict], lr: float, weight_decay: float,
                    momentum: float = PUBLISHED_MOMENTUM,
                    fused: Optional[bool] = None) -> torch.optim.SGD:
    """SGD over the model's named groups ({"name", "params", "lr_mult", "weight_decay_mult"}).

    Each group gets lr = lr * lr_mult and weight_decay = weight_decay * weight_decay_mult (1x/2x/
    10x/20x lr; decay on weights only), plus "base_lr" for the poly schedule. Frozen parameters
    may stay in a group: their grad is None, so SGD skips them (as in the published code).

    fused (default: when every parameter is a float tensor on the CPU or CUDA): one kernel per
    step instead of separate weight-decay / momentum / update passes over the ~100 M weights of
    ResNet-38; the same per-element formula, only the rounding of intermediate sums may differ."""
    groups = _named_groups(param_groups, lr, weight_decay)
    if fused is None:
        fused = _fused_ok(groups)
    # Keyword arguments on purpose: see the module docstring for the published positional bug.
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=0.0,
                           weight_decay=weight_decay, nesterov=False, fused=fused or None)


def build_adamw(param_groups: Iterable[dict], lr: float, weight_decay: float,
                betas=(0.9, 0.999), eps: float = 1e-8,
                fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the same named groups as :func:`build_optimizer`:
    lr = lr * lr_mult, weight_decay = weight_decay * weight_decay_mult, "base_lr" kept for the
    schedule."""
    groups = _named_groups(param_groups, lr, weight_decay)
    if fused is None:
        fused = _fused_ok(groups)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay, fused=fused or None)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, max_step: int,
                power: float = POLY_POWER, warmup_iters: int = 0,
                warmup_ratio: float = 0.0) -> float:
    """Set every group's lr for 0-based ``step`` (call before optimizer.step(), as published);
    returns the lr of the first group (the one the published log prints). With
    ``warmup_iters`` the first steps warm up linearly (:func:`warmup_poly_lr`)."""
    for g in optimizer.param_groups:
        g["lr"] = warmup_poly_lr(step, g["base_lr"], max_step, power, warmup_iters, warmup_ratio)
    return optimizer.param_groups[0]["lr"]
