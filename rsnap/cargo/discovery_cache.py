"""Skip `cargo metadata` and `rustc -vV` when nothing they depend on changed since the last call.

Every restore and save needs the workspace layout (`cargo metadata`, ~15-20 ms of CPU through
the rustup proxy) and the compiler version (`rustc -vV`, ~11-16 ms), two process spawns the
Python parent pays for too (~5 ms each). On a persistent runner, and for the save that follows a
restore in the same job, the answers are the same as last time. After a call, `save` writes
`<target>/.rsnap/discovery.json`: the outputs, and the stat (size, mtime_ns, inode, ctime_ns,
or absent) of every file their answers depend on:

- in the directory rsnap was started from, the manifest's dir, the workspace root and all their
  ancestors: `Cargo.toml`, `Cargo.lock`, `.cargo/config{,.toml}`, `rust-toolchain{,.toml}`;
- each member's `Cargo.toml` and the dir holding each member dir (a new member matched by a
  `members` glob adds an entry there);
- `$CARGO_HOME/config{,.toml}`;
- `rustc` and `cargo` as found on PATH (or $RUSTC / $CARGO), and with rustup: `settings.toml`,
  `update-hashes/*` and each installed toolchain's `bin/rustc` and `bin/cargo` (an update
  replaces them);

plus the working directory, the `--manifest-path` argument and every `CARGO*`/`RUST*` variable
and PATH. `lookup` (before anything is spawned) looks for the file where the target dir would be
by default (`<dir with Cargo.toml>/target` for the start dir and its ancestors) or where
`CARGO_TARGET_DIR`/`CARGO_BUILD_TARGET_DIR` put it, and uses it only if every one of those is
unchanged; otherwise cargo and rustc run as before. `RSNAP_NO_DISCOVERY_CACHE=1` turns it off.
"""
from __future__ import annotations

import json
import os

FILE = "discovery.json"
_VERSION = 1
_NAMES = ("Cargo.toml", "Cargo.lock", ".cargo/config", ".cargo/config.toml", "rust-toolchain",
          "rust-toolchain.toml")


def _enabled() -> bool:
    return os.environ.get("RSNAP_NO_DISCOVERY_CACHE", "").lower() not in ("1", "true", "yes", "on")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(("CARGO", "RUST")) or k in ("PATH", "HOME")}


def _ancestors(path: str) -> list[str]:
    out, path = [], os.path.abspath(path)
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def _stat(path: str):
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d or ".", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _watched(start: str, manifest_path: str | None, meta: dict) -> list[str]:
    dirs = set(_ancestors(start)) | set(_ancestors(meta["workspace_root"]))
    if manifest_path:
        dirs |= set(_ancestors(os.path.dirname(os.path.abspath(manifest_path))))
    paths = {os.path.join(d, n) for d in dirs for n in _NAMES}
    for pkg in meta["packages"]:
        if pkg.get("source") is None:
            paths.add(pkg["manifest_path"])
            paths.add(os.path.dirname(os.path.dirname(pkg["manifest_path"])))
    home = os.environ.get("CARGO_HOME") or os.path.join(os.path.expanduser("~"), ".cargo")
    paths |= {os.path.join(home, "config"), os.path.join(home, "config.toml")}
    for tool, var in (("rustc", "RUSTC"), ("cargo", "CARGO")):
        found = os.environ.get(var) or _which(tool)
        if found:
            paths.add(found)
    rustup = os.environ.get("RUSTUP_HOME") or os.path.join(os.path.expanduser("~"), ".rustup")
    if os.path.isdir(rustup):
        paths |= {os.path.join(rustup, "settings.toml"), os.path.join(rustup, "update-hashes"),
                  os.path.join(rustup, "toolchains")}
        for sub, names in (("update-hashes", ("",)), ("toolchains", ("bin/rustc", "bin/cargo"))):
            try:
                entries = os.listdir(os.path.join(rustup, sub))
            except OSError:
                continue
            paths |= {os.path.join(rustup, sub, e, n) if n else os.path.join(rustup, sub, e)
                      for e in entries for n in names}
    return sorted(paths)


def _candidates(start: str) -> list[str]:
    out = [os.environ[v] for v in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR") if os.environ.get(v)]
    out += [os.path.join(d, "target") for d in _ancestors(start) if os.path.isfile(os.path.join(d, "Cargo.toml"))]
    return [os.path.join(os.path.abspath(t), ".rsnap", FILE) for t in out]


def _start(manifest_path: str | None) -> str:
    return os.path.dirname(os.path.abspath(manifest_path)) if manifest_path else os.getcwd()


def lookup(manifest_path: str | None) -> list | None:
    """The recorded results ([cmd, cwd, stdout] lists) if nothing they depend on changed."""
    if not _enabled():
        return None
    cwd, env = os.getcwd(), _env()
    for path in _candidates(_start(manifest_path)):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        try:
            if (doc.get("version") != _VERSION or doc["cwd"] != cwd or doc["manifest_path"] != manifest_path
                    or doc["env"] != env):
                continue
            watched = doc["stats"]
            if sorted(watched) != _watched(_start(manifest_path), manifest_path, doc["meta"]):
                continue
            if all(_stat(p) == s for p, s in watched.items()):
                return doc["results"]
        except (KeyError, TypeError, AttributeError):
            continue
    return None


SLACK_NS = 2_000_000_000  # ctime comes from the kernel's coarse clock


def save(target_dir, manifest_path: str | None, results: list, started_ns: int) -> None:
    """Record this call's successful `cargo metadata --no-deps` and `rustc -vV` results, unless
    a file they depend on changed since (or just before) they were started at `started_ns`."""
    if not _enabled():
        return
    meta = next((json.loads(out) for cmd, _cwd, out in results if "metadata" in cmd and "--no-deps" in cmd), None)
    if meta is None or not os.path.isdir(target_dir):
        return
    start = _start(manifest_path)
    doc = {"version": _VERSION, "cwd": os.getcwd(), "manifest_path": manifest_path, "env": _env(),
           "meta": {"workspace_root": meta["workspace_root"],
                    "packages": [{"manifest_path": p["manifest_path"], "source": p.get("source")}
                                 for p in meta["packages"]]},
           "results": results}
    doc["stats"] = {p: _stat(p) for p in _watched(start, manifest_path, doc["meta"])}
    if any(s is not None and s[3] >= started_ns - SLACK_NS for s in doc["stats"].values()):
        return  # changed while (or just before) cargo looked: its answer may predate the change
    path = os.path.join(str(target_dir), ".rsnap", FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except OSError:
        pass  # only saves time
