"""The bodies of `rsnap explain` and the rebuild part of `rsnap status` (free of typer)."""
from __future__ import annotations

import json
import sys

from ..cargo.layout import discover


def explain(manifest_path: str | None, as_json: bool) -> None:
    from ..snapshot import predict
    ws = discover(manifest_path)
    out = predict.explain(ws)
    if as_json:
        sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
        return
    lines = [f"rsnap: {out['summary']} ({out['fresh']} of {out['units']} units fresh)"]
    for e in out["rebuilt"]:
        lines.append(f"  {e['package']} {e['target']} {e['name']}: {e['reason']}")
    if out.get("note"):
        lines.append(f"rsnap: note: {out['note']}")
    elif out["mispredicted"]:
        lines.append(f"rsnap: {len(out['mispredicted'])} units mispredicted at restore:")
        lines += [f"  {m['package']} {m['target']} {m['name']}: {m['verdict']} ({m['reason']})" for m in out["mispredicted"]]
    else:
        lines.append("rsnap: the prediction at restore was right")
    sys.stdout.write("\n".join(lines) + "\n")


def status_rebuild(ws, st, m, inputs: dict) -> dict:
    """`rebuild`, `notes` and `summary` for `rsnap status`: what a restore of `m` would predict."""
    from ..snapshot import predict
    out = predict.for_status(ws, st, m, inputs)
    return {k: out[k] for k in ("rebuild", "notes", "key_differences", "summary")}
