"""Training curves from ``metrics.jsonl``.

Each record is one JSON line with ``iter``, the total ``loss`` and one ``loss_<term>`` per loss
term (EPS: ``loss_cls`` and ``loss_sal``; the CAM baseline: ``loss_cls`` only, or in files written
before that change, a ``loss_sal`` that is 0 throughout). Which curves are drawn is decided by the
pure function :func:`series_to_plot`, so the rules are testable without reading a picture:

- the total is drawn once;
- the terms are drawn only when more than one of them is non-zero: with a single term the total
  *is* that term, and two identical curves on top of each other read as one curve with a legend
  entry too many;
- a series that is zero everywhere (the baseline's old ``loss_sal``) is never drawn.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from utils.io import atomic_path

TOTAL = "loss"
TERM_PREFIX = "loss_"


def _number(v) -> Optional[float]:
    """A JSON value as a float, or None for anything that is not a number (bool included: it is
    an int to Python but never a loss)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def read_records(metrics_path) -> List[Dict]:
    """The loss records of a metrics file: lines with a numeric ``iter`` and ``loss`` (other
    records, e.g. evaluation lines a future trainer might add, are skipped, as are blank lines)."""
    recs = []
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if isinstance(r, dict) and _number(r.get("iter")) is not None \
                and _number(r.get(TOTAL)) is not None:
            recs.append(r)
    return recs


def values(records: Sequence[Dict], key: str) -> List[Tuple[float, float]]:
    """(iter, value) of every record that holds a number under ``key``."""
    out = []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            out.append((float(r["iter"]), v))
    return out


def is_zero(series: Sequence[Tuple[float, float]]) -> bool:
    """No point, or every value exactly 0 (a NaN is not zero: a diverged run must show)."""
    return all(v == 0.0 for _, v in series)


def term_keys(records: Sequence[Dict]) -> List[str]:
    """The ``loss_<term>`` keys, in the order they first appear (loss_cls before loss_sal)."""
    keys: List[str] = []
    for r in records:
        for k in r:
            if k.startswith(TERM_PREFIX) and k not in keys and _number(r[k]) is not None:
                keys.append(k)
    return keys


def _same(a: Sequence[Tuple[float, float]], b: Sequence[Tuple[float, float]]) -> bool:
    """Whether two series hold the same values at the same iterations (up to float rounding:
    the total and a sole term are averaged separately over the logging window)."""
    da, db = dict(a), dict(b)
    if da.keys() != db.keys():
        return False
    return all(math.isclose(da[i], db[i], rel_tol=1e-6, abs_tol=1e-9) for i in da)


def series_to_plot(records: Sequence[Dict]) -> List[Tuple[str, str]]:
    """(key, legend label) of each curve to draw, the total first."""
    total = values(records, TOTAL)
    terms = [k for k in term_keys(records) if not is_zero(values(records, k))]
    out: List[Tuple[str, str]] = []
    if len(terms) == 1 and _same(total, values(records, terms[0])):
        return [(TOTAL, f"{TOTAL} (= {terms[0]})")]
    if not is_zero(total):
        out.append((TOTAL, f"{TOTAL} (total)" if terms else TOTAL))
    # One term that differs from the total (a weighted loss, say) is drawn too: hiding it
    # would make the reader believe they are equal.
    out += [(k, k) for k in terms]
    return out


def use_log_scale(ys: Sequence[float]) -> bool:
    """Log y when the curves span more than a decade: a loss falling from 0.7 to 0.02 is a flat
    line near zero on a linear axis after the first few hundred iterations. Never with a zero
    or negative value (it would vanish from the plot)."""
    finite = [y for y in ys if math.isfinite(y)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > 10


def _plain_log_ticks(ax, ys: Sequence[float]) -> None:
    """Decimal tick labels (0.05, not 5 x 10^-2: losses are read as decimals), with the 2 and 5
    minor ticks labelled too when the axis spans less than two decades (otherwise a short axis
    has a single labelled tick, or none)."""
    from matplotlib.ticker import FuncFormatter
    finite = [y for y in ys if math.isfinite(y) and y > 0]
    few_decades = math.log10(max(finite) / min(finite)) < 2

    def minor(y, _pos):
        if y <= 0 or not few_decades:
            return ""
        mantissa = round(y / 10 ** math.floor(math.log10(y)), 6)
        return f"{y:g}" if mantissa in (2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def plot_losses(metrics_path, out_path, title: str) -> None:
    """Loss curves of a run as a PNG (written atomically); nothing is written when the metrics
    file holds no loss record yet. ``title`` names the run, e.g. "voc12_eps (resnet38_eps)"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    if not records:
        return
    chosen = series_to_plot(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    all_y: List[float] = []
    for n, (key, label) in enumerate(chosen):
        pts = values(records, key)
        its, ys = [p[0] for p in pts], [p[1] for p in pts]
        all_y += ys
        last = f"{ys[-1]:.3g}" if ys else "-"
        # The total in black and on top, the terms in colour and thinner: the eye reads the
        # total first, and the terms show what it is made of.
        style = dict(color="black", linewidth=2.0, zorder=3) if key == TOTAL else \
            dict(color=f"C{n}", linewidth=1.2, zorder=2)
        # A marker per point when there are few: a two-point run is otherwise a bare segment,
        # and a one-point run draws nothing at all.
        ax.plot(its, ys, label=f"{label}: last {last}", marker="o" if len(ys) <= 20 else None,
                markersize=3, **style)
    if use_log_scale(all_y):
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
        _plain_log_ticks(ax, all_y)
    else:
        ax.set_ylabel("loss")
    iters = [float(r["iter"]) for r in records]
    ax.set_title(f"{title}\niterations {min(iters):g}-{max(iters):g}", fontsize=11)
    ax.set_xlabel("iteration")
    if chosen:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "every loss is 0", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
