"""Training curves (placeholder until the pictures branch lands)."""
from __future__ import annotations

import json
from pathlib import Path

from utils.io import atomic_path


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> None:
    """Loss curves from metrics.jsonl as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    its = [r["iter"] for r in recs]
    for key in sorted(k for k in recs[0] if k.startswith("loss")):
        ax.plot(its, [r[key] for r in recs], label=key)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
