"""How a training stage spreads its published effective batch over the GPUs it has.

The published runs fixed the effective batch of each training stage (EPS classifier: VOC 8, COCO
16; DeepLab-v2: 5 x 2 accumulated = 10). On G GPUs per node and N nodes, a stage runs as

    effective batch B = b (per process and pass) x p (processes) x a (accumulated passes)

exactly, whatever the hardware, so every machine trains the published recipe. The planner
(:func:`plan_layout`) is pure arithmetic and chooses, in this order:

1. p = g x N with g <= G: torchrun starts the same number of processes on every node, and p must
   divide B (b and a are whole numbers);
2. b <= ``max_per_process`` where the stage has such a bound (DeepLab: 5, the published pass);
3. fastest first: the fewest images each process handles one after the other per step, b x a =
   B / p, i.e. the most processes that divide B; equal counts cannot tie (b x a falls with p);
4. then the fewest accumulated passes a (the largest b within the bound).

An override (``SEG_NGPUS`` / ``CLS_NGPUS`` in the scripts) fixes g, and a fixed accumulation
(``ITER_SIZE`` for the classifier) fixes a; a combination that cannot keep B exactly is refused
with the counts that can. Examples (docs/pipelines.md has the full table):

    classifier, VOC 8 on 3 GPUs:  8 = 4 x 2 x 1 on 2 of 3 GPUs (3 does not divide 8)
    DeepLab 10 on 1 GPU:          10 = 5 x 1 x 2 (at most 5 per process and pass)
    DeepLab 10 on 4 GPUs:         10 = 5 x 2 x 1 on 2 of 4 GPUs
    DeepLab 10 on 2 nodes x 4:    10 = 5 x 2 x 1 on 1 GPU per node
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from utils.errors import UserError


class LayoutError(UserError):
    """The effective batch cannot be kept on the processes asked for; the message says which
    counts can."""


@dataclass(frozen=True)
class Layout:
    """One stage's process layout: ``per_process x processes x accum == effective``."""
    what: str               # "classifier", "DeepLab" (for the plan line)
    effective: int          # B
    per_process: int        # b: images per process and pass
    procs_per_node: int     # g
    nodes: int              # N
    accum: int              # a: passes accumulated per optimizer step
    gpus_per_node: int      # G: what the node offers
    reason: str = ""        # why not every GPU, or why accumulation

    @property
    def processes(self) -> int:
        return self.procs_per_node * self.nodes

    @property
    def global_batch(self) -> int:
        """Images of one pass over all processes (train_seg.py's --batch-size)."""
        return self.per_process * self.processes

    def describe(self, unit: str = "GPUs") -> str:
        """e.g. 'DeepLab on 2 of 4 GPUs: 10 = 5 x 2 x 1 (per process x processes x
        accumulation); 4 processes cannot split 10'."""
        if self.nodes > 1:
            where = f"{self.procs_per_node} of {self.gpus_per_node} {unit} per node x {self.nodes} nodes"
        else:
            where = f"{self.procs_per_node} of {self.gpus_per_node} {unit}"
        text = (f"{self.what} on {where}: {self.effective} = {self.per_process} x "
                f"{self.processes} x {self.accum} (per process x processes x accumulation)")
        return text + (f"; {self.reason}" if self.reason else "")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(share: int, max_per_process: Optional[int], accum: Optional[int]):
    """(b, a) with b x a == share: the fewest passes with b <= max_per_process, or the fixed a."""
    if accum is not None:
        if share % accum:
            return None
        b = share // accum
        return (b, accum) if max_per_process is None or b <= max_per_process else None
    for a in divisors(share):
        b = share // a
        if max_per_process is None or b <= max_per_process:
            return b, a
    return None


def plan_layout(effective: int, gpus_per_node: int, nodes: int = 1, *, what: str = "stage",
                max_per_process: Optional[int] = None, procs_per_node: Optional[int] = None,
                accum: Optional[int] = None, override: str = "") -> Layout:
    """The layout of a stage with effective batch ``effective`` on ``nodes`` nodes of
    ``gpus_per_node`` GPUs (see the module docstring for the rules). ``procs_per_node`` and
    ``accum`` fix g and a (``override`` names the variable that fixed g, for the messages)."""
    for name, v in (("effective batch", effective), ("GPUs per node", gpus_per_node),
                    ("nodes", nodes)):
        if v < 1:
            raise LayoutError(f"{what}: {name} must be >= 1, got {v}")
    if accum is not None and accum < 1:
        raise LayoutError(f"{what}: accumulation must be >= 1, got {accum}")
    choices = [procs_per_node] if procs_per_node is not None else range(gpus_per_node, 0, -1)
    for g in choices:
        p = g * nodes
        if effective % p:
            continue
        split = _split(effective // p, max_per_process, accum)
        if split is None:
            continue
        b, a = split
        reasons = []
        if procs_per_node is not None:
            reasons.append(f"set by {override or 'the process count'}")
        elif g < gpus_per_node:
            reasons.append(f"{gpus_per_node * nodes} processes cannot split {effective}"
                           if nodes == 1 else
                           f"{gpus_per_node} per node x {nodes} nodes cannot split {effective}")
        if a > 1 and accum is None:
            reasons.append(f"at most {max_per_process} per process and pass")
        elif accum is not None and accum > 1:
            reasons.append(f"accumulation {accum} asked for")
        return Layout(what, effective, b, g, nodes, a, gpus_per_node, "; ".join(reasons))
    raise LayoutError(_refusal(effective, gpus_per_node, nodes, what, max_per_process,
                               procs_per_node, accum, override))


def working_counts(effective: int, nodes: int = 1, max_per_process: Optional[int] = None,
                   accum: Optional[int] = None, limit: Optional[int] = None) -> List[int]:
    """Processes per node that keep ``effective`` exactly (up to ``limit`` per node)."""
    top = limit or effective
    return [g for g in range(1, top + 1) if effective % (g * nodes) == 0
            and _split(effective // (g * nodes), max_per_process, accum) is not None]


def _refusal(effective, gpus_per_node, nodes, what, max_per_process, procs_per_node, accum,
             override) -> str:
    ok = working_counts(effective, nodes, max_per_process, accum)
    per = " per node" if nodes > 1 else ""
    asked = (f"{procs_per_node} processes{per}" + (f" ({override})" if override else "")
             if procs_per_node is not None else f"any of 1..{gpus_per_node} processes{per}")
    bound = f" with at most {max_per_process} per process and pass" if max_per_process else ""
    acc = f" and accumulation {accum}" if accum is not None else ""
    fix = (f"use {', '.join(map(str, ok))} processes{per}" if ok
           else f"no process count{per} works on {nodes} nodes: use NNODES dividing {effective}")
    return (f"{what}: the effective batch {effective} cannot be split exactly over {asked}"
            f"{' x ' + str(nodes) + ' nodes' if nodes > 1 else ''}{bound}{acc}; {fix}, or "
            f"change the batch (a deviation from the published recipe)")
