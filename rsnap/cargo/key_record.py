"""Key continuity: the key is chosen once, at restore, and the next save in that target dir uses it.

A workspace that does not commit Cargo.lock has no lockfile at restore and one at save (cargo
wrote it), so the two would compute different default keys and every run would be a partial
hit. Like actions/cache, `rsnap restore` records the key it looked up in `<target>/.rsnap/key.json`
and the first `rsnap save` after it takes that key (an explicit --key / RSNAP_KEY wins), then
removes the record, so a persistent runner's later saves compute a fresh key. The record is
only used while every other key input (toolchain, paths, config files, env) is unchanged:
only Cargo.lock may differ.
"""
from __future__ import annotations

import json
import os

from .layout import RSNAP_DIR

RECORD = "key.json"
# key inputs allowed to differ between the restore that recorded a key and the save that uses it
MAY_DIFFER = ("cargo_lock",)


def _path(ws):
    return ws.target_dir / RSNAP_DIR / RECORD


def remember(ws, key: str, inputs: dict, source: str) -> None:
    """Record the key a restore used (`source`: "default" or "explicit"). Failing is harmless."""
    path = _path(ws)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps({"key": key, "source": source, "inputs": _comparable(inputs)}, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def choose(ws, explicit: str | None, default: str, inputs: dict) -> tuple[str, str]:
    """(key, key_source) for a save: "explicit" (--key/RSNAP_KEY), "restore" (the recorded key of
    the restore before it), or "default" (derived now)."""
    if explicit:
        return explicit, "explicit"
    try:
        rec = json.loads(_path(ws).read_text())
        from .keys import KEY_PATTERN
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and KEY_PATTERN.match(rec["key"]) \
                and rec.get("inputs") == _comparable(inputs):
            return rec["key"], "restore"
    except (OSError, ValueError):
        pass
    return default, "default"


def consume(ws) -> None:
    """A save used (or overrode) the record: the next save computes its own key."""
    try:
        _path(ws).unlink()
    except OSError:
        pass


def _comparable(inputs: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in inputs.items() if k not in MAY_DIFFER}, sort_keys=True))
