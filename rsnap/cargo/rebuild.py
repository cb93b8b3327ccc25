"""Which units cargo will rebuild and why (prediction), and which it did rebuild (truth).

Prediction replays cargo's freshness checks (rsnap.cargo.fingerprints) on the units of a
snapshot, assuming the next build builds the same units the snapshot's build did:

* `CheckDepInfo`: a source in the unit's dep-info newer than the dep-info file, or missing;
* `RerunIfChanged`: a `rerun-if-changed` path newer than the script's `output`, or missing;
  a path build script without rerun-if-changed reruns when any file of its package changed;
* `RerunIfEnvChanged` and dep-info `env-dep` values against the environment;
* the fingerprint fields a new build would hash differently, where knowable before cargo runs:
  `rustflags` (RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS / `[build] rustflags`), `features` and
  `declared_features` (from `cargo metadata`, only when a Cargo.toml or Cargo.lock changed),
  and registry/git versions against Cargo.lock;
* a unit rebuilds when a dependency it names (by fingerprint) rebuilds or is missing.

Source mtimes come from a *view*: after a restore the real (normalized) mtimes; for `rsnap
status` the working tree compared with the snapshot's source records by content.

Truth (`rsnap explain`): cargo writes a unit's hash file after every successful compile or
build-script run of it, and never for a fresh unit; restore records each hash file's content and
mtime, so a unit whose hash file changed, or a new one, was rebuilt. Its reason comes from the
old and new fingerprint JSON and the recorded dep-info/output mtimes.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from . import fingerprints as fpr
from . import mtimes

INF = 1 << 62
MAX_NAMES = 3


def _rel(path: str, root: str) -> str:
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def _below(path: str, d: str) -> bool:
    return path == d or path.startswith(d.rstrip("/") + "/")


class RestoredSources:
    """After a restore: real mtimes (normalized), and the files normalization found changed."""

    def __init__(self, ws, records: list[list], changed_paths):
        self.root = str(ws.root)
        self.records = {r[0]: r for r in records}
        self.changed = {str(p) for p in changed_paths}
        self._recorded_files = [os.path.join(self.root, r[0]) if not r[0].startswith("/") else r[0]
                                for r in records if r[1] == "f"]

    def mtime(self, path: str) -> int | None:
        try:
            return os.stat(path).st_mtime_ns
        except OSError:
            return None

    def state(self, path: str) -> str:
        if not os.path.exists(path):
            return "removed"
        if path in self.changed:
            return "changed" if _rel(path, self.root) in self.records else "added"
        return "same"

    def changes_under(self, d: str) -> list[tuple[str, str]]:
        out = [(p, self.state(p)) for p in self.changed if _below(p, d)]
        out += [(p, "removed") for p in self._recorded_files if _below(p, d) and not os.path.exists(p)]
        return sorted(set(out))


class WorkingTreeSources(RestoredSources):
    """Without restoring (`rsnap status`): the working tree against the snapshot's source records
    (content equal: the recorded mtime, as restore would set it; different: newer than anything)."""

    def __init__(self, ws, records: list[list]):
        super().__init__(ws, records, ())
        self.ws = ws
        self._memo: dict[str, str] = {}

    def state(self, path: str) -> str:
        if path not in self._memo:
            rec = self.records.get(_rel(path, self.root))
            try:
                st = os.stat(path)
            except OSError:
                self._memo[path] = "removed"
                return "removed"
            if rec is None:
                self._memo[path] = "added" if not os.path.isdir(path) else "same"
            elif rec[1] != "f":
                self._memo[path] = "same"
            else:
                from ..digest import hash_file
                self._memo[path] = "same" if st.st_size == rec[2] and hash_file(Path(path)) == rec[4] else "changed"
        return self._memo[path]

    def mtime(self, path: str) -> int | None:
        s = self.state(path)
        if s == "removed":
            return None
        rec = self.records.get(_rel(path, self.root))
        return rec[3] if s == "same" and rec is not None else INF

    def changes_under(self, d: str) -> list[tuple[str, str]]:
        out = []
        for _dir, _is_dir, entries in mtimes._walk_sources(Path(d), mtimes._skip_dirs(self.ws)):
            for de in entries:
                if de.is_file() and (s := self.state(de.path)) != "same":
                    out.append((de.path, s))
        out += [(p, "removed") for p in self._recorded_files if _below(p, d) and not os.path.exists(p)]
        return sorted(set(out))


# ---------------------------------------------------------------- what the next build will use

class BuildSettings:
    """What the next build hashes into fingerprints, where knowable; None means "not checked"."""

    def __init__(self):
        self.rustflags: list[str] | None = None
        self.features: dict[str, tuple[list[str], list[str]]] | None = None   # package -> (features, declared)
        self.lock: dict[str, list[tuple[str, str]]] | None = None             # package -> [(version, source)]
        self.notes: list[str] = []


def current_rustflags(ws, config_files) -> list[str] | None:
    """The RUSTFLAGS cargo will pass: CARGO_ENCODED_RUSTFLAGS, RUSTFLAGS, else `[build] rustflags`
    of the config files (None when a `[target]` rustflags makes it unknowable here)."""
    env = os.environ
    if "CARGO_ENCODED_RUSTFLAGS" in env:
        return [f for f in env["CARGO_ENCODED_RUSTFLAGS"].split("\x1f") if f]
    if "RUSTFLAGS" in env:
        return env["RUSTFLAGS"].split()
    import tomllib
    for path in config_files:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if any(isinstance(t, dict) and "rustflags" in t for t in doc.get("target", {}).values()):
            return None
        flags = doc.get("build", {}).get("rustflags")
        if flags is not None:
            return shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags]
    return []


def build_settings(ws, old_inputs: dict, new_inputs: dict, view) -> BuildSettings:
    s = BuildSettings()
    if any(old_inputs.get(k) != new_inputs.get(k) for k in ("env", "cargo_config")):
        s.rustflags = current_rustflags(ws, list(new_inputs.get("cargo_config", {})))
        if s.rustflags is None:
            s.notes.append("target-specific rustflags in the cargo config: RUSTFLAGS changes not predicted")
    lock_changed = old_inputs.get("cargo_lock") != new_inputs.get("cargo_lock")
    if lock_changed and new_inputs.get("cargo_lock"):
        s.lock = _read_lock(ws.root / "Cargo.lock")
    manifests = [str(d / "Cargo.toml") for d in {ws.root, *ws.path_package_dirs}]
    if lock_changed or any(view.state(p) != "same" for p in manifests):
        s.features = _metadata_features(ws, s)
    return s


def _read_lock(path: Path) -> dict[str, list[tuple[str, str]]] | None:
    import tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    out: dict[str, list[tuple[str, str]]] = {}
    for p in doc.get("package", []):
        out.setdefault(p.get("name", ""), []).append((str(p.get("version", "")), str(p.get("source", ""))))
    return out


def _metadata_features(ws, s: BuildSettings):
    """package -> (resolved features, declared features) from `cargo metadata` (offline, locked if there
    is a Cargo.lock: it must not write one)."""
    import json
    from . import prefetch
    cmd = ["cargo", "metadata", "--format-version", "1", "--offline", "--manifest-path", str(ws.manifest_path)]
    if (ws.root / "Cargo.lock").exists():
        cmd.append("--locked")
    else:
        s.notes.append("no Cargo.lock: feature changes not predicted")
        return None
    try:
        code, out, _err = prefetch.run(cmd, str(ws.root), timeout=120)
        meta = json.loads(out) if code == 0 else None
    except (OSError, ValueError):
        meta = None
    if not meta or not meta.get("resolve"):
        s.notes.append("cargo metadata failed: feature changes not predicted")
        return None
    names = {p["id"]: (p["name"], sorted(p.get("features", {}))) for p in meta["packages"]}
    found: dict[str, tuple[list[str], list[str]]] = {}
    for node in meta["resolve"]["nodes"]:
        name, declared = names.get(node["id"], (None, []))
        if name is not None:
            old = found.get(name, ([], []))
            found[name] = (sorted(set(old[0]) | set(node.get("features", []))), sorted(set(old[1]) | set(declared)))
    return found


# ---------------------------------------------------------------- prediction

def unit_version(tree, u: fpr.Unit) -> str | None:
    """Version (registry) or short rev (git) of a non-path unit, from rustc's makefile dep-info."""
    from .layout import parse_makefile_depinfo
    from .target_layout import makefile_depinfo_candidates
    crate = u.target.replace("-", "_")
    for rel in makefile_depinfo_candidates(u.profile_dir, u.package, u.unit_hash, crate):
        data = tree.read(rel)
        if data:
            found = fpr.source_version(parse_makefile_depinfo(data.decode(errors="replace")))
            if found:
                return found.split("@", 1)[1] if "@" in found else found[len(u.package) + 1:]
    return None


class Predictor:
    def __init__(self, ws, units: list[fpr.Unit], tree, view, settings: BuildSettings):
        self.ws, self.units, self.tree, self.view, self.settings = ws, units, tree, view, settings
        self.root = str(ws.root)
        self.home = str(ws.cargo_home)
        self.by_fp = {u.fingerprint: u for u in units}
        self.pkg_dirs = {name: str(d) for name, d in ws.package_dirs_by_name.items()}
        self.old_features: dict[str, set] = {}
        self.switch: dict[str, fpr.Unit] = {}    # unit -> the unit of the snapshot cargo will use instead
        self.switch_reason: dict[str, str] = {}
        for u in units:
            if u.kind != "run-build-script" and u.features() is not None:
                self.old_features.setdefault(u.package, set()).update(u.features())

    def run(self) -> list[dict]:
        memo: dict[str, dict | None] = {}
        order: list[fpr.Unit] = []

        leftovers: dict[str, bool] = {}

        def visit(u: fpr.Unit, used: bool = False) -> dict | None:
            """`used`: cargo will use this unit (it replaces one of the snapshot's build)."""
            if u.hash_rel in memo:
                return memo[u.hash_rel]
            if not used:
                if u.hash_rel not in leftovers:
                    leftovers[u.hash_rel] = self.leftover(u)
                if leftovers[u.hash_rel]:
                    return None
            memo[u.hash_rel] = None  # a cycle (never in a valid graph) ends here
            entry = self.direct(u)
            if entry is None and u.hash_rel in self.switch:  # cargo will use another unit of the snapshot
                memo[u.hash_rel] = visit(self.switch[u.hash_rel], True)
                return memo[u.hash_rel]
            roots: set[str] = set()
            deps: set[str] = set()
            switched = dict(u.dep_fingerprints())
            for name, fp in u.dep_fingerprints():
                d = self.by_fp.get(fp)
                if d is None:  # only in a unit cargo switches to (leftover() checked the others)
                    deps.add(name)
                    roots.add(f"{name} (not in the snapshot)")
                    continue
                de = visit(d, used)
                if d.hash_rel in self.switch:
                    switched[name] = self.switch[d.hash_rel].fingerprint
                    if de is None:
                        de = {"roots": [f"{d.package} ({self.switch_reason[d.hash_rel]})"]}
                if de is not None:
                    deps.add(d.package)
                    roots.update(de.get("roots") or [d.package])
            if entry is None and switched != dict(u.dep_fingerprints()):
                twin = next((w for w in self.units if w.key == u.key and w is not u
                             and dict(w.dep_fingerprints()) == switched), None)
                if twin is not None:  # built against the new dependencies before: in the snapshot
                    self.switch[u.hash_rel] = twin
                    memo[u.hash_rel] = visit(twin, True)
                    return memo[u.hash_rel]
            if entry is None and deps:
                entry = {"cause": "dependency", "dependencies": sorted(deps), "roots": sorted(roots),
                         "reason": "depends on " + ", ".join(sorted(roots))}
            elif entry is not None and deps:
                entry["dependencies"] = sorted(deps)
            if entry is not None:
                entry.update(package=u.package, target=u.kind, name=u.target, unit=u.unit_hash)
                order.append(u)
            memo[u.hash_rel] = entry
            return entry

        for u in sorted(self.units, key=lambda u: u.hash_rel):
            visit(u)
        return [memo[u.hash_rel] for u in order]

    def _locked(self, v: str | None, package: str) -> bool:
        return bool(v) and any(ver == v or src.rsplit("#", 1)[-1].startswith(v) for ver, src in self.settings.lock[package])

    def leftover(self, u: fpr.Unit) -> bool:
        """A unit the snapshot's own build did not use: stale already in the state the snapshot
        recorded (a dependency missing, or a recorded source newer than its dep-info). Every unit a
        build uses is fresh right after it, so cargo's next build will not touch this one either."""
        if any(fp not in self.by_fp for _n, fp in u.dep_fingerprints()):
            return True
        records = getattr(self.view, "records", {})
        pkg_root = self.pkg_dirs.get(u.package)
        for item in u.local("CheckDepInfo"):
            rel = item.get("dep_info") if isinstance(item, dict) else None
            data = self.tree.read(rel) if isinstance(rel, str) else None
            ref = self.tree.mtime(rel) if data is not None else None
            if ref is None or pkg_root is None:
                continue
            for kind, p in fpr.decode_depinfo(data)[0]:
                if kind == fpr.PACKAGE_ROOT:
                    rec = records.get(_rel(os.path.normpath(os.path.join(pkg_root, p)), self.root))
                    if rec is not None and rec[3] > ref:
                        return True
        return False

    def direct(self, u: fpr.Unit) -> dict | None:
        s = self.settings
        if u.kind != "run-build-script":
            if s.rustflags is not None and u.json.get("rustflags") != s.rustflags:
                return {"cause": "rustflags", "reason": f"RUSTFLAGS changed ({' '.join(u.json.get('rustflags') or []) or 'none'}"
                        f" -> {' '.join(s.rustflags) or 'none'})"}
            if s.features is not None and u.package in s.features and u.features() is not None:
                new, declared = s.features[u.package]
                old = self.old_features.get(u.package, set())
                if set(new) != old:
                    return {"cause": "features", "reason": "features changed (" + ", ".join(
                        [f"+{f}" for f in sorted(set(new) - old)] + [f"-{f}" for f in sorted(old - set(new))]) + ")"}
                if u.declared_features() is not None and declared != u.declared_features():
                    return {"cause": "features", "reason": "declared features changed"}
            if s.lock is not None and u.package not in self.pkg_dirs and u.package in s.lock:
                v = unit_version(self.tree, u)
                if v and not self._locked(v, u.package):
                    now = ", ".join(sorted(ver for ver, _src in s.lock[u.package]))
                    twin = next((w for w in self.units if w.key == u.key and w is not u
                                 and self._locked(unit_version(self.tree, w), u.package)), None)
                    if twin is not None:  # the locked version was built before: in the snapshot
                        self.switch[u.hash_rel] = twin
                        self.switch_reason[u.hash_rel] = f"Cargo.lock: {v} -> {now}"
                        return None
                    return {"cause": "lockfile", "reason": f"Cargo.lock: {u.package} {v} -> {now} (not in the snapshot)"}
        files = self.changed_inputs(u)
        if files is None:
            return {"cause": "missing", "reason": "fingerprint evidence missing from the snapshot"}
        if files:
            entry = {"cause": "files", "files": files}
            env = [f for f in files if f["change"] == "env"]
            if env:
                entry["cause"] = "env"
            names = [f"{f['path']} {f['change']}" for f in files[:MAX_NAMES]]
            more = f" and {len(files) - MAX_NAMES} more" if len(files) > MAX_NAMES else ""
            entry["reason"] = ", ".join(names) + more
            return entry
        return None

    def changed_inputs(self, u: fpr.Unit) -> list[dict] | None:
        """Inputs cargo will find newer than the unit's dep-info / output (or missing); None when
        the fingerprint's own evidence (dep-info, output) is missing."""
        pkg_root = self.pkg_dirs.get(u.package)
        found: dict[str, str] = {}
        for item in u.local("CheckDepInfo"):
            rel = item.get("dep_info") if isinstance(item, dict) else None
            data = self.tree.read(rel) if isinstance(rel, str) else None
            ref = self.tree.mtime(rel) if data is not None else None
            if ref is None:
                return None
            paths, env = fpr.decode_depinfo(data)
            for kind, p in paths:
                if kind != fpr.PACKAGE_ROOT:
                    continue  # build-root files are written by the unit's build-script run (a dependency)
                if not p.startswith("/"):
                    if pkg_root is None:
                        continue
                    p = os.path.normpath(os.path.join(pkg_root, p))
                if _below(p, self.home):
                    continue  # cargo skips registry and git sources
                self._check(p, ref, found)
            for name, value in env:
                if not name.startswith("CARGO") and name != "OUT_DIR" and os.environ.get(name) != value:
                    found[f"${name}"] = "env"
        for item in u.local("RerunIfChanged"):
            if pkg_root is None or not isinstance(item, dict):
                continue
            ref = self.tree.mtime(item.get("output", ""))
            if ref is None:
                return None
            for p in item.get("paths") or []:
                p = os.path.normpath(os.path.join(pkg_root, p))
                if os.path.isdir(p):
                    for q, change in self.view.changes_under(p):
                        found[q] = change
                else:
                    self._check(p, ref, found)
        for item in u.local("RerunIfEnvChanged"):
            if isinstance(item, dict) and os.environ.get(item.get("var", "")) != item.get("val"):
                found[f"${item.get('var')}"] = "env"
        if u.kind == "run-build-script" and u.local("Precalculated") and pkg_root is not None:
            nested = [d for d in self.pkg_dirs.values() if d != pkg_root and _below(d, pkg_root)]
            for q, change in self.view.changes_under(pkg_root):
                if not any(_below(q, d) for d in nested):
                    found[q] = change
        if found and pkg_root is not None and u.kind in ("lib", "bin", "proc-macro"):
            for q, change in self.view.changes_under(pkg_root):  # a new module file explains a changed lib.rs
                if change == "added" and q.endswith(".rs"):
                    found.setdefault(q, change)
        return [{"path": _rel(p, self.root), "change": c} for p, c in sorted(found.items(), key=_file_order)]

    def _check(self, p: str, ref: int, found: dict) -> None:
        m = self.view.mtime(p)
        if m is None:
            found[p] = "removed"
        elif m > ref:
            s = self.view.state(p)
            found[p] = s if s != "same" else "newer"


def _file_order(item):
    return ({"changed": 0, "removed": 1, "added": 2}.get(item[1], 3), item[0])


# ---------------------------------------------------------------- summaries

def summary(entries: list[dict], verb: str = "will rebuild") -> str:
    """'3 crates will rebuild: a (src/lib.rs changed), b, c (depend on a)'."""
    by_pkg: dict[str, str] = {}
    for e in entries:
        reason = e.get("reason", "")
        if e.get("cause") == "dependency":
            reason = "depend on " + ", ".join(e.get("roots") or e.get("dependencies") or [])
        if e["package"] not in by_pkg or (by_pkg[e["package"]].startswith("depend on") and e.get("cause") != "dependency"):
            by_pkg[e["package"]] = reason
    if not by_pkg:
        return f"no crate {verb}"
    groups: list[tuple[list[str], str]] = []
    for pkg, reason in by_pkg.items():
        if groups and groups[-1][1] == reason and reason.startswith("depend on"):
            groups[-1][0].append(pkg)
        else:
            groups.append(([pkg], reason))
    parts = []
    for pkgs, reason in groups:
        if len(pkgs) == 1 and reason.startswith("depend on"):
            reason = "depends on" + reason[len("depend on"):]
        parts.append(f"{', '.join(pkgs)} ({reason})" if reason else ", ".join(pkgs))
    n = len(by_pkg)
    return f"{n} crate{'s' if n != 1 else ''} {verb}: " + ", ".join(parts)


def unit_record(tree, u: fpr.Unit) -> dict:
    """What explain needs to know later about a unit as restored."""
    refs = [item.get("dep_info") for item in u.local("CheckDepInfo") if isinstance(item, dict)] + \
           [item.get("output") for item in u.local("RerunIfChanged") if isinstance(item, dict)]
    return {"package": u.package, "kind": u.kind, "target": u.target, "fingerprint": u.fingerprint,
            "mtime_ns": tree.mtime(u.hash_rel), "ref_mtime_ns": max((tree.mtime(r) or 0 for r in refs if r), default=0),
            "json": {k: u.json.get(k) for k in ("rustflags", "features", "declared_features", "deps", "profile",
                                                 "target", "path", "rustc", "config")}}
