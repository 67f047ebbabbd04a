"""Progress a person can follow: a tqdm bar on a terminal, plain log lines everywhere else.

A progress bar redrawn with carriage returns is noise in a log file (100 KB of it for the demo)
and invisible to a script that reads the log. So :class:`Progress` draws a bar only when stderr
is a terminal; otherwise it logs one line every ``interval`` seconds (and at the end), e.g.::

    train voc12_eps: 340/20000 (1.7%) loss 0.4120 lr 9.85e-03 | 2.10 it/s | ETA 2h36m

Every such line contains "ETA", so a wrapper (script/demo.sh) can show the latest one.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("progress")

DEFAULT_INTERVAL_S = 10.0


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7 -> '7s'."""
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """``update(n, **postfix)`` after each step; ``close()`` (or ``with``) at the end.
    ``enabled=False`` (e.g. ranks other than 0) makes it silent. A caller that logs its own
    progress line calls :meth:`mark` so that no second line follows it within ``interval``."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True,
                 interval: float = DEFAULT_INTERVAL_S, unit: str = "it", terminal: Optional[bool] = None):
        self.total, self.desc, self.n, self.unit = int(total), desc, int(initial), unit
        self.enabled, self.interval = enabled, float(interval)
        self.postfix = ""
        self.t0 = self.t_last = time.perf_counter()
        self.n0 = self.n
        terminal = is_terminal() if terminal is None else terminal
        self.bar = (tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                         mininterval=1.0) if enabled and terminal else None)
        # On a terminal, log lines are printed above the bar instead of through it.
        self._redirect = contextlib.ExitStack()
        if self.bar is not None:
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = " ".join(f"{k} {v}" for k, v in postfix.items())
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.t_last >= self.interval:
            self.t_last = now
            logger.info("%s", self.line(now))

    def set(self, **postfix) -> None:
        """Values shown with the progress (e.g. loss=..., lr=...)."""
        self.postfix = " ".join(f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)

    def mark(self) -> None:
        """The caller just logged a line of its own: restart the interval."""
        self.t_last = time.perf_counter()

    def rate(self, now: Optional[float] = None) -> float:
        now = time.perf_counter() if now is None else now
        return (self.n - self.n0) / max(now - self.t0, 1e-9)

    def eta(self, now: Optional[float] = None) -> str:
        rate = self.rate(now)
        return format_duration((self.total - self.n) / rate) if rate > 0 else "?"

    def line(self, now: Optional[float] = None) -> str:
        now = time.perf_counter() if now is None else now
        pct = 100.0 * self.n / max(self.total, 1)
        post = f" {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} ({pct:.1f}%){post} | "
                f"{self.rate(now):.2f} {self.unit}/s | ETA {self.eta(now)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
