"""Progress on a terminal, silence in CI logs and under --json."""
from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, label: str, total: int = 0, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty() and not os.environ.get("CI")
        self.enabled = enabled
        self.label = label
        self.total = total
        self.done = 0
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self._last > 0.1:
            self._last = time.monotonic()
            pct = f" {100 * self.done // self.total}%" if self.total else ""
            sys.stderr.write(f"\r{self.label}: {_human(self.done)}{pct}   ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 24) + "\r")
            sys.stderr.flush()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


human_bytes = _human
