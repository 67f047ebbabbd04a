"""The model infer.py runs: :func:`prepare_for_inference` returns the fastest correct form of a
trained classifier for a device, with every speed choice inside it, so the CAM code only calls
``forward_cam`` / ``forward_views``.

* ``fast=False``: the published loop's model as it is (NCHW, fp32, one view at a time).
* CPU: the graph of :func:`network.cpu.fastest_cpu_graph` (Winograd / frozen oneDNN / eager).
* CUDA: channels_last, optional float16 autocast, an image and its flip as one batch.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from network.registry import get_head


@dataclass(frozen=True)
class SpeedOptions:
    """infer.py's speed flags; none of them changes a pseudo-mask (tests/test_infer.py)."""
    fast: bool = True             # feature-resolution flip-pair sums (network/cam.py)
    fuse: bool = True             # CPU: a fused inference graph
    winograd: bool = True         # CPU, with fuse: Winograd F(2x2,3x3) for wide 3x3 convs
    channels_last: bool = True    # NHWC activations (eager / CUDA)
    batch_views: Optional[bool] = None  # image + flip as one batch; None: on CUDA only
    amp: bool = False             # CUDA float16 autocast (changes CAMs slightly)


class InferenceModel:
    """A prepared classifier: ``forward_cam(x)`` -> float32 raw maps, ``forward_views(batch)``
    -> the same for a stack of views (batched or one at a time), plus ``head``,
    ``num_classes``, ``device``, ``fast`` and a one-line ``description``."""

    def __init__(self, module: nn.Module, *, head, num_classes: int, device: torch.device,
                 fast: bool, channels_last: bool, batch_views: bool, amp: bool, description: str):
        self.module, self.head, self.num_classes = module, head, num_classes
        self.device, self.fast, self.batch_views = device, fast, batch_views
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast = (torch.autocast("cuda", dtype=torch.float16)
                         if amp and device.type == "cuda" else nullcontext())
        self.description = description

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.module.forward_cam(x.contiguous(memory_format=self.memory_format)).float()

    def forward_views(self, batch: torch.Tensor) -> torch.Tensor:
        if self.batch_views:
            return self.forward_cam(batch)
        return torch.cat([self.forward_cam(v[None]) for v in batch])


def prepare_for_inference(model: nn.Module, device: torch.device,
                          speed: SpeedOptions = SpeedOptions()) -> InferenceModel:
    """The fastest correct inference form of ``model`` on ``device`` (``model`` may be changed:
    moved, put in eval mode, given another memory format)."""
    head, c = get_head(model), model.num_classes
    model = model.to(device).eval()
    common = dict(head=head, num_classes=c, device=device, amp=speed.amp and device.type == "cuda")
    if not speed.fast:
        return InferenceModel(model, fast=False, channels_last=False, batch_views=False,
                              description="the published loop: one view at a time, NCHW",
                              **common)
    batch_views = device.type == "cuda" if speed.batch_views is None else speed.batch_views
    if device.type == "cpu":
        from network.cpu import fastest_cpu_graph

        module = fastest_cpu_graph(model, fuse=speed.fuse, winograd=speed.winograd,
                                   channels_last=speed.channels_last)
        # The fused graphs pick their own input layout; the eager one takes the flag's.
        channels_last = speed.channels_last and module is model
        desc = getattr(module, "description",
                       f"eager network{', channels_last' if channels_last else ''}")
    else:
        module = model.to(memory_format=torch.channels_last if speed.channels_last
                          else torch.contiguous_format)
        channels_last = speed.channels_last
        desc = f"eager network{', channels_last' if channels_last else ''}"
    desc += ", image and flip batched" if batch_views else ""
    desc += ", float16 autocast" if common["amp"] else ""
    return InferenceModel(module, fast=True, channels_last=channels_last,
                          batch_views=batch_views, description=desc, **common)
