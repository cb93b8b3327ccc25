"""Reading cargo's fingerprints: the units of a target dir, what each one checks, and its edges.

A unit owns a fingerprint dir (where, in either of cargo's layouts: rsnap.cargo.target_layout),
holding per target (checked on cargo 1.95):

* `<kind>-<target>`: the unit's fingerprint, 16 hex digits (the little-endian bytes of a u64);
* `<kind>-<target>.json`: what went into it: `rustc`, `features`, `declared_features`, `target`,
  `profile`, `path`, `deps` (`[pkg hash, extern name, public, dependency fingerprint as u64]`),
  `local` (`CheckDepInfo {dep_info}`, `RerunIfChanged {output, paths}`, `RerunIfEnvChanged`,
  `Precalculated`), `rustflags`, `config`, `compile_kind`;
* `dep-<kind>-<target>`: cargo's binary dep-info (below).

`kind` is lib, bin, build-script (compiling build.rs), run-build-script (running it), test-lib,
example, ... A dependency edge names the dependency's fingerprint, which is the content of
its hash file, so the unit graph is rebuilt from the files alone.

Files are read through a *tree*: `DiskTree` (a target dir) or a snapshot's manifest
(rsnap.snapshot.predict), so a prediction can be made before anything is restored.
"""
from __future__ import annotations

import json
import os
import re
import struct

from . import target_layout
from .target_layout import fingerprint_dir_of

KINDS = ("run-build-script", "build-script", "test-integration-test", "integration-test", "test-lib", "test-bin",
         "test-example", "test-bench", "check-lib", "doc-lib", "doc-bin", "example", "bench", "lib", "bin")
_NOT_HASH = ("dep-", "output-")
_REGISTRY_PATH = re.compile(r"/registry/src/[^/]+/(?P<pkg>[^/]+)/")
_GIT_PATH = re.compile(r"/git/checkouts/(?P<repo>[^/]+)/(?P<rev>[0-9a-f]+)/")
PACKAGE_ROOT, BUILD_ROOT = 0, 1


class Unit:
    """One unit of a target dir, identified by its hash file `hash_rel` (relative to the tree)."""
    __slots__ = ("package", "unit_hash", "kind", "target", "fp_dir", "hash_rel", "fingerprint", "json", "profile_dir")

    def __init__(self, package, unit_hash, kind, target, fp_dir, hash_rel, profile_dir):
        self.package, self.unit_hash, self.kind, self.target = package, unit_hash, kind, target
        self.fp_dir, self.hash_rel, self.profile_dir = fp_dir, hash_rel, profile_dir
        self.fingerprint = ""    # hex content of the hash file
        self.json: dict = {}

    @property
    def key(self) -> tuple[str, str, str]:
        return self.package, self.kind, self.target

    def dep_fingerprints(self) -> list[tuple[str, str]]:
        """(extern name, fingerprint hex) of each dependency edge."""
        out = []
        for d in self.json.get("deps") or []:
            if isinstance(d, list) and len(d) >= 4 and isinstance(d[3], int) and 0 <= d[3] < 1 << 64:
                out.append((str(d[1]), struct.pack("<Q", d[3]).hex()))
        return out

    def local(self, name: str) -> list:
        return [item[name] for item in self.json.get("local") or [] if isinstance(item, dict) and name in item]

    def features(self) -> list[str] | None:
        return _string_list(self.json.get("features"))

    def declared_features(self) -> list[str] | None:
        return _string_list(self.json.get("declared_features"))


def _string_list(text) -> list[str] | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return sorted(str(x) for x in v) if isinstance(v, list) else None


def split_kind(name: str) -> tuple[str, str] | None:
    """'lib-ws_core' -> ('lib', 'ws_core'); 'run-build-script-build-script-build' -> ('run-build-script', ...)."""
    for kind in KINDS:
        if name.startswith(kind + "-"):
            return kind, name[len(kind) + 1:]
    return None


def hash_files(tree):
    """(path, fingerprint dir, package, unit hash, profile dir, kind, target) of every unit's hash file."""
    for rel in tree.fingerprint_files():
        where = fingerprint_dir_of(rel)
        name = rel.rsplit("/", 1)[-1]
        if where is None or name.endswith(".json") or name.startswith(_NOT_HASH) or name == "invoked.timestamp":
            continue
        kt = split_kind(name)
        if kt is not None:
            yield (rel, *where, *kt)


def read_units(tree) -> list[Unit]:
    """Every unit with a hash file and a readable JSON in the tree."""
    units = []
    for rel, fp_dir, package, unit_hash, profile_dir, kind, target in hash_files(tree):
        u = Unit(package, unit_hash, kind, target, fp_dir, rel, profile_dir)
        try:
            u.fingerprint = (tree.read(rel) or b"").decode().strip()
            u.json = json.loads(tree.read(rel + ".json") or b"{}")
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(u.json, dict):
            continue
        if u.kind == "lib" and _is_proc_macro(tree, u):
            u.kind = "proc-macro"
        units.append(u)
    return units


def _is_proc_macro(tree, u: Unit) -> bool:
    """cargo names a proc-macro's fingerprint like a lib's; its artifact is a shared object."""
    return any(tree.exists(p) for p in target_layout.proc_macro_candidates(u.profile_dir, u.package, u.unit_hash, u.target))


def decode_depinfo(data: bytes) -> tuple[list[tuple[int, str]], list[tuple[str, str | None]]]:
    """cargo's binary dep-info: ([(path type, path)], [(env var, value)]). Path type 0 is relative to
    the package root (or absolute), 1 to the build root (the target dir). Format (cargo 1.95):
    marker u32 1 + 0xff, version u8 (1), u32 file count, per file: type u8, u32 length, bytes, a
    checksum flag u8 (+ u64 size, u32 length, bytes when set); u32 env count, per var: u32 length,
    name, u8 has-value (+ u32 length, value). Older cargo wrote no marker and no checksum flags."""
    pos = 0

    def u8():
        nonlocal pos
        pos += 1
        return data[pos - 1]

    def u32():
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", data, pos - 4)[0]

    def text():
        nonlocal pos
        n = u32()
        pos += n
        if pos > len(data):
            raise ValueError("truncated")
        return data[pos - n:pos].decode("utf-8", "surrogateescape")

    try:
        checksums = data[:5] == b"\x01\x00\x00\x00\xff"
        if checksums:
            pos = 6
        files = []
        for _ in range(u32()):
            kind = u8()
            path = text()
            if checksums and u8():
                pos += 8
                text()
            files.append((kind, path))
        env = []
        if pos < len(data):
            for _ in range(u32()):
                name = text()
                env.append((name, text() if u8() else None))
        return files, env
    except (IndexError, struct.error, ValueError):
        return [], []


def source_version(paths) -> str | None:
    """`name-version` of a registry package, or `repo@rev` of a git checkout, from its dep-info paths."""
    for p in paths:
        if m := _REGISTRY_PATH.search(p):
            return m.group("pkg")
        if m := _GIT_PATH.search(p):
            return f"{m.group('repo')}@{m.group('rev')}"
    return None


def read_noatime(path) -> bytes:
    """Read without updating atime (so GC never fakes usage); plain read if not permitted."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


class ManifestTree:
    """A target root as a snapshot's entries describe it (path -> entry: `type`, `digest`,
    `mtime_ns`); subclasses say where a file's bytes come from (`read`)."""

    def __init__(self, entries):
        self.entries = {e.path: e for e in entries}

    def fingerprint_files(self):
        return [p for p, e in self.entries.items() if e.type in ("f", "h") and fingerprint_dir_of(p)]

    def _file(self, rel: str):
        e = self.entries.get(rel)
        if e is not None and e.type == "h":
            e = self.entries.get(e.digest) if not e.link_root else None
        return e if e is not None and e.type == "f" else None

    def mtime(self, rel: str) -> int | None:
        e = self._file(rel)
        return e.mtime_ns if e is not None else None

    def exists(self, rel: str) -> bool:
        return rel in self.entries


class DiskTree:
    """A target (or build) dir on disk."""

    def __init__(self, root):
        self.root = str(root)

    def fingerprint_files(self):
        for dirpath, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not target_layout.skip_when_looking_for_fingerprints(dirpath, d)]
            rel_dir = os.path.relpath(dirpath, self.root)
            for fn in files:
                if fingerprint_dir_of(f"{rel_dir}/{fn}"):
                    yield f"{rel_dir}/{fn}"

    def read(self, rel: str) -> bytes | None:
        try:  # without touching atime: GC takes a read fingerprint for a unit a build used
            return read_noatime(f"{self.root}/{rel}")
        except OSError:
            return None

    def mtime(self, rel: str) -> int | None:
        try:
            return os.stat(f"{self.root}/{rel}").st_mtime_ns
        except OSError:
            return None

    def exists(self, rel: str) -> bool:
        return os.path.exists(f"{self.root}/{rel}")
