"""Wall-clock time per phase of one restore or save, reported in `--json` as `timings`.

One process-wide recorder: `mark(name)` charges the time since the previous mark to `name`
(phases that repeat add up). `start` is when rsnap's entry module was imported, so the first
phase includes rsnap's own imports; Python's start-up before that is not seen from inside
(measure it from outside: ~20 ms here).
"""
from __future__ import annotations

import time

_t0 = time.perf_counter()
_last = _t0
_phases: dict[str, float] = {}


def mark(name: str) -> None:
    global _last
    now = time.perf_counter()
    _phases[name] = _phases.get(name, 0.0) + (now - _last)
    _last = now


def report() -> dict:
    """{phase: seconds} in the order first seen, plus `total` since start (rounded to 0.1 ms)."""
    out = {k: round(v, 4) for k, v in _phases.items()}
    out["total"] = round(time.perf_counter() - _t0, 4)
    return out


def reset() -> None:
    """Start over (a process that runs more than one command, e.g. tests calling commands directly)."""
    global _t0, _last
    _t0 = _last = time.perf_counter()
    _phases.clear()
