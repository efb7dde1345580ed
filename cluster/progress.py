"""Progress lines on stderr for long runs and sweeps: virtual time done, runs done, an ETA.

Only on a terminal: when stderr is not a TTY (a pipe, a log file, a Ray job) nothing is
printed. Wall time is read here for the display only; it never reaches a result.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_MIN_INTERVAL_S = 0.5


def _eta(elapsed_s: float, fraction: float) -> str:
    if fraction <= 0:
        return "?"
    left = elapsed_s * (1 - fraction) / fraction
    return f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"


class Progress:
    """``update(done, total)`` redraws one status line (at most twice a second)."""

    def __init__(self, label: str, unit: str, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled if enabled is not None else bool(isatty and isatty())
        self.label = label
        self.unit = unit
        self.t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def line(self, done: float, total: float) -> str:
        frac = done / total if total else 1.0
        return (f"{self.label}: {done:g}/{total:g} {self.unit} ({100 * frac:.0f}%), "
                f"ETA {_eta(time.monotonic() - self.t0, frac)}")

    def update(self, done: float, total: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < _MIN_INTERVAL_S and done < total:
            return
        self._last = now
        self.stream.write("\r\033[K" + self.line(done, total))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
