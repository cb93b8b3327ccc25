"""Clock skew between the saving machine and this one.

A snapshot saved where the clock ran ahead carries artifact mtimes in this machine's future.
Restored as they are, an edit made after the restore (a patch step, a code generator, a
developer) would be older than the artifacts, and cargo would call the crate fresh: stale.

So restore moves every mtime it sets (target and build-dir entries, recorded sources) back by
one offset, until the newest artifact lies just behind this machine's "now". One offset for all
keeps every comparison cargo makes (source vs dep-info, rerun-if-changed vs build-script
output) as it was on the saving machine, so unchanged crates stay fresh. The exception is a
path package whose build script prints no `rerun-if-changed`: cargo hashes the newest mtime
of its files into the fingerprint, so it reruns after a shift. `$CARGO_HOME` is not shifted:
cargo does not compare its mtimes against artifacts.
"""
from __future__ import annotations

import time

from ..repository import manifest as mf

MARGIN_NS = 1_000_000_000  # a shifted snapshot's newest artifact ends this far behind "now"


def newest_artifact_ns(m: mf.Manifest) -> int:
    return max((e.mtime_ns for r in m.roots if not r.merge for e in r.entries), default=0)


def shift_for(m: mf.Manifest, now_ns: int | None = None) -> int:
    """0 if no artifact lies in this machine's future, else how far to move every mtime back
    so that the newest artifact ends MARGIN_NS behind now."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    ahead = newest_artifact_ns(m) - now_ns
    return ahead + MARGIN_NS if ahead > 0 else 0


def shift_back(m: mf.Manifest, offset_ns: int) -> None:
    """Move every mtime restore will set for target/build roots and sources back by offset_ns."""
    if offset_ns <= 0:
        return
    for root in m.roots:
        if not root.merge:
            root.entries = [e._replace(mtime_ns=e.mtime_ns - offset_ns) for e in root.entries]
    m.sources = [[*s[:3], s[3] - offset_ns, *s[4:]] for s in m.sources]
