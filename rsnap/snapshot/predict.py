"""Rebuild prediction at restore and status, the record explain compares against, and explain.

During a restore, once fingerprint files and normalized sources are in place and before the
data files are written, `after_restore` predicts from the target root as the restore will leave
it (real, normalized source mtimes) and writes `<target>/.rsnap/prediction.json`: every unit's hash file as restored
(content, mtime, fingerprint JSON fields, dep-info/output mtime) and the prediction. `status`
predicts from the snapshot's manifest (fingerprint files read from the store) and the working
tree compared with the snapshot's source records, writing nothing. `explain` reads the record
and the target dir after the build (see rsnap.cargo.rebuild for what counts as rebuilt).
"""
from __future__ import annotations

import json
import os

from ..cargo import fingerprints as fpr, rebuild
from ..cargo.layout import RSNAP_DIR
from ..errors import RsnapError, EXIT_WORKSPACE
from ..repository import repo

RECORD = "prediction.json"
INCREMENTAL_SETTINGS = ("env CARGO_INCREMENTAL", "env CARGO_BUILD_INCREMENTAL")
KEY_INPUT_NAMES = ("rustc", "target", "cargo_lock", "rust_toolchain", "cargo_config", "env", "job")


class SnapshotTree(fpr.ManifestTree):
    """The root of a snapshot holding cargo's units (the build dir), read from the store
    (fingerprint files are small)."""

    def __init__(self, store, m):
        root = m.root("build") or m.root("target")
        super().__init__(root.entries if root else [])
        self.store, self.m = store, m

    def read(self, rel: str) -> bytes | None:
        e = self._file(rel)
        if e is None or e.size > 1 << 20 or e.digest not in self.m.blobs:
            return None
        return repo.read_blob(self.store, self.m.blobs[e.digest], e.digest)


def key_differences(old: dict, new: dict) -> list[str]:
    """Which key inputs differ from the snapshot's (a partial hit): 'Cargo.lock', 'env RUSTFLAGS', ..."""
    out = []
    for name in KEY_INPUT_NAMES:
        a, b = old.get(name), new.get(name)
        if a == b or (name == "job" and not a and not b):   # older snapshots have no job
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{'env' if name == 'env' else 'config'} {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append({"cargo_lock": "Cargo.lock", "rustc": "toolchain", "target": "target triple", "job": "CI job"}.get(name, name))
    return out


def settings_before_restore(ws, m, inputs: dict):
    """What the next build will hash differently (rsnap.cargo.rebuild.build_settings), found before
    the restore takes cargo's locks: it may run `cargo metadata`, which would wait for them."""
    return rebuild.build_settings(ws, m.key_inputs or {}, inputs, rebuild.WorkingTreeSources(ws, m.sources))


def _predict(ws, m, inputs: dict, tree, view, settings=None) -> dict:
    units = fpr.read_units(tree)
    if settings is None:
        settings = rebuild.build_settings(ws, m.key_inputs or {}, inputs, view)
    entries = rebuild.Predictor(ws, units, tree, view, settings).run()
    for e in entries:
        e.pop("roots", None) if e.get("cause") != "dependency" else None
    diff = key_differences(m.key_inputs or {}, inputs)
    notes = list(settings.notes)
    if diff:
        notes.insert(0, "key inputs differ from the snapshot's: " + ", ".join(diff))
    incremental = [d for d in diff if d in INCREMENTAL_SETTINGS]
    if incremental:   # cargo hashes the effective setting per unit, which depends on profile, CI, cargo
        return {"rebuild": None, "units": len(units), "notes": notes, "key_differences": diff, "_units": units,
                "summary": f"rebuild not predicted: {', '.join(incremental)} changed (the workspace's own "
                           "crates rebuild if that turns incremental compilation on or off)"}
    return {"rebuild": entries, "units": len(units), "notes": notes, "key_differences": diff,
            "summary": rebuild.summary(entries), "_units": units}


def after_restore(ws, m, inputs: dict, changed_paths, snapshot: str, tree=None, settings=None) -> dict:
    """Predict for a restore and record what explain needs. `tree`: the build dir as the restore
    leaves it (rsnap.snapshot.partial.PlannedTree, read before the data files are written), else
    the build dir on disk. The result keeps the units read (`_units`) for a partial restore."""
    tree = tree if tree is not None else fpr.DiskTree(ws.build_dir)
    out = _predict(ws, m, inputs, tree, rebuild.RestoredSources(ws, m.sources, changed_paths), settings)
    write_record(ws, {"snapshot": snapshot, "predicted": True, "rebuild": out["rebuild"],
                      "units": {u.hash_rel: rebuild.unit_record(tree, u) for u in out["_units"]}})
    return out


def after_miss(ws) -> None:
    """A miss: nothing is predicted, but explain still reports what the build compiled."""
    tree = fpr.DiskTree(ws.build_dir)
    try:
        units = {u.hash_rel: rebuild.unit_record(tree, u) for u in fpr.read_units(tree)}
    except OSError:
        units = {}
    write_record(ws, {"snapshot": None, "predicted": False, "rebuild": [], "units": units})


def for_status(ws, store, m, inputs: dict) -> dict:
    out = _predict(ws, m, inputs, SnapshotTree(store, m), rebuild.WorkingTreeSources(ws, m.sources))
    out.pop("_units")
    return out


def write_record(ws, data: dict) -> None:
    path = ws.target_dir / RSNAP_DIR / RECORD
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def read_record(ws) -> dict:
    path = ws.target_dir / RSNAP_DIR / RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RsnapError(f"nothing to explain: no `rsnap restore` recorded in {ws.target_dir}", EXIT_WORKSPACE) from None
    except (OSError, ValueError) as e:
        raise RsnapError(f"cannot read {path}: {e}", EXIT_WORKSPACE) from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), dict):
        raise RsnapError(f"cannot read {path}: not an rsnap prediction record", EXIT_WORKSPACE)
    return data


# ---------------------------------------------------------------- truth

def explain(ws) -> dict:
    """What cargo rebuilt since the restore, why, and where the prediction was wrong."""
    rec = read_record(ws)
    old = rec["units"]
    tree = fpr.DiskTree(ws.build_dir)
    units = fpr.read_units(tree)
    by_fp = {u.fingerprint: u for u in units}
    old_by_key: dict[tuple, list[dict]] = {}
    for o in old.values():
        old_by_key.setdefault((o["package"], o["kind"], o["target"]), []).append(o)
    rebuilt_units = [u for u in units if (o := old.get(u.hash_rel)) is None
                     or (o["fingerprint"], o["mtime_ns"]) != (u.fingerprint, tree.mtime(u.hash_rel))]
    rebuilt_fps = {u.fingerprint for u in rebuilt_units}
    rebuilt = []
    for u in rebuilt_units:
        o = old.get(u.hash_rel)
        counterpart = o or next(iter(old_by_key.get(u.key, [])), None)
        rebuilt.append({"package": u.package, "target": u.kind, "name": u.target, "unit": u.unit_hash, "new_unit": o is None,
                        **_why(ws, u, counterpart, o is not None, tree, by_fp, rebuilt_fps)})
    rank = _dependency_order(units, by_fp)
    rebuilt.sort(key=lambda e: rank.get((e["package"], e["target"], e["name"]), 0))
    out = {"snapshot": rec.get("snapshot"), "rebuilt": rebuilt, "units": len(units),
           "fresh": len(units) - len(rebuilt), "predicted": rec.get("rebuild", []),
           "summary": rebuild.summary(rebuilt, "rebuilt")}
    out["mispredicted"] = mispredicted(rec.get("rebuild", []), rebuilt) if rec.get("predicted") else []
    if not rec.get("predicted"):
        out["note"] = "the restore was a miss: nothing was predicted"
    return out


def _dependency_order(units: list, by_fp: dict) -> dict:
    """(package, kind, target) -> position with dependencies first."""
    rank: dict = {}
    seen: set = set()

    def visit(u):
        if u.hash_rel in seen:
            return
        seen.add(u.hash_rel)
        for _n, fp in u.dep_fingerprints():
            if fp in by_fp:
                visit(by_fp[fp])
        rank.setdefault(u.key, len(rank))
    for u in sorted(units, key=lambda u: u.hash_rel):
        visit(u)
    return rank


def mispredicted(predicted: list[dict], rebuilt: list[dict]) -> list[dict]:
    p = {(e["package"], e["target"], e["name"]): e for e in predicted}
    r = {(e["package"], e["target"], e["name"]): e for e in rebuilt}
    out = []
    for k in sorted(set(p) ^ set(r)):
        e = p.get(k) or r[k]
        out.append({"package": k[0], "target": k[1], "name": k[2], "predicted": k in p, "rebuilt": k in r,
                    "reason": e.get("reason", ""),
                    "verdict": "predicted a rebuild, cargo kept it fresh" if k in p else "rebuilt, not predicted"})
    return out


def _why(ws, u: fpr.Unit, o: dict | None, same_unit: bool, tree, by_fp: dict, rebuilt_fps: set) -> dict:
    if o is None:
        return {"cause": "new", "reason": "not in the snapshot (first build of this unit here)"}
    oj, nj = o.get("json") or {}, u.json
    for field, cause, text in (("rustflags", "rustflags", "RUSTFLAGS changed"), ("features", "features", "features changed"),
                               ("declared_features", "features", "declared features changed"),
                               ("rustc", "toolchain", "toolchain changed"), ("profile", "profile", "profile changed"),
                               ("target", "target", "target settings changed"), ("config", "config", "config changed")):
        if oj.get(field) != nj.get(field):
            detail = f" ({oj.get(field)} -> {nj.get(field)})" if field in ("rustflags", "features") else ""
            return {"cause": cause, "reason": text + detail}
    deps = sorted({by_fp[fp].package for _n, fp in u.dep_fingerprints() if fp in rebuilt_fps and fp in by_fp})
    old_fps = {str(d[3]) for d in oj.get("deps") or [] if isinstance(d, list) and len(d) >= 4}
    new_fps = {str(d[3]) for d in nj.get("deps") or [] if isinstance(d, list) and len(d) >= 4}
    if not same_unit and oj.get("path") != nj.get("path"):
        return {"cause": "lockfile", "reason": "package source or version changed"}
    if old_fps != new_fps and not deps:
        changed = sorted({str(d[1]) for d in nj.get("deps") or [] if isinstance(d, list) and len(d) >= 4
                          and str(d[3]) not in old_fps})
        return {"cause": "dependency", "dependencies": changed, "reason": "dependency changed: " + ", ".join(changed)}
    files = _newer_inputs(ws, u, o.get("ref_mtime_ns") or 0) if same_unit else []
    if files:
        names = [f"{f['path']} {f['change']}" for f in files[:rebuild.MAX_NAMES]]
        more = f" and {len(files) - rebuild.MAX_NAMES} more" if len(files) > rebuild.MAX_NAMES else ""
        return {"cause": "files", "files": files, "reason": ", ".join(names) + more}
    if deps:
        return {"cause": "dependency", "dependencies": deps, "reason": "dependency rebuilt: " + ", ".join(deps)}
    return {"cause": "unknown", "reason": "rebuilt; no difference found in its fingerprint inputs"}


def _newer_inputs(ws, u: fpr.Unit, ref: int) -> list[dict]:
    """Inputs of the unit (as cargo recorded them now) newer than its dep-info/output as restored."""
    view = rebuild.RestoredSources(ws, [], ())
    p = rebuild.Predictor(ws, [u], fpr.DiskTree(ws.build_dir), view, rebuild.BuildSettings())

    class _AtRestore(fpr.DiskTree):  # the reference mtimes as they were at restore
        def mtime(self, rel):
            return ref if super().mtime(rel) is not None else None
    p.tree = _AtRestore(ws.build_dir)
    files = p.changed_inputs(u) or []
    for f in files:
        if f["change"] == "newer":
            f["change"] = "changed"
    return files
