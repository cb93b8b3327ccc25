"""A restore from a remote store that fails midway becomes a clean miss.

A damaged pack (missing, corrupt, unreadable past the retries) costs only the units it touches
(rsnap.snapshot.damage), so what reaches here is a failure of the store as a whole outside the
pack reads (e.g. the check for missing packs cannot reach it). Restore writes fingerprints last,
so the target is then as an interrupted restore leaves it: units without fingerprints, never a
fingerprint vouching for foreign content. For a local store that stays an error (exit 3: the
store itself is broken). For a remote one the CI job should go on and build: `as_miss` removes
every fingerprint of the target/build dirs (cargo then rebuilds every unit and trusts none of
what was written) and the `restoring` marker, so the job's `rsnap save` is allowed, and
`rsnap restore` reports a miss and exits 0.
"""
from __future__ import annotations

import os
import shutil

from ..cargo import layout, target_layout
from .roots import RESTORING_MARKER


def as_miss(ws) -> int:
    """Drop every fingerprint below the target and build dirs; returns how many files went."""
    removed = 0
    for root in {str(ws.target_dir), str(ws.build_dir)}:
        for dirpath, dirs, files in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if ".fingerprint" in dirs:
                shutil.rmtree(os.path.join(dirpath, ".fingerprint"), ignore_errors=True)
                dirs.remove(".fingerprint")
                removed += 1
            for fn in files:
                if target_layout.is_fingerprint_path(rel_dir + fn):
                    try:
                        os.unlink(os.path.join(dirpath, fn))
                        removed += 1
                    except OSError:
                        pass
        marker = os.path.join(root, layout.RSNAP_DIR, RESTORING_MARKER)
        if os.path.exists(marker):
            os.unlink(marker)
    return removed
