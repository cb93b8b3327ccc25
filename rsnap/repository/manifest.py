"""Snapshot manifest: what a snapshot contains, serialized as zstd-compressed JSON.

A manifest lists, per root (target dir, build dir, $CARGO_HOME subset), every entry
as [relpath, type, mode, size, mtime_ns, digest]; `digest` is the xxh3-128 of a
file's content, a symlink's target, or "" for a directory; an "h" entry is a hard
link whose digest is the path of a file entry of the same root, or (format 3) of the root named
by a seventh element (cargo's uplifts from a separate build dir into the target dir). `blobs` maps each digest
to its location [pack, offset, compressed_len, size]; `chunks` maps the digest of a big file
stored in pieces (rsnap.repository.chunking) to the digests of its chunks, each a blob. `sources` records the files
cargo's freshness checks read: [path, type, size, mtime_ns, digest], path relative
to the workspace root (absolute when outside it).

Readers validate everything before a single byte is written (hostile input).
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import NamedTuple

import zstandard

from ..cargo.layout import CARGO_HOME_TREES, is_cargo_home_excluded, is_excluded_target_path
from ..cargo.target_layout import is_fingerprint_path
from ..cargo import rustc_info
from ..errors import FormatError, NewerFormatError

FORMAT_VERSION = 3  # 2: `chunks`; 3: hard links across roots (formats 1 and 2 are still read)
MAX_MANIFEST_BYTES = 2 << 30
MAX_FILE_SIZE = 1 << 40
_DIGEST = re.compile(r"^[0-9a-f]{32}$")
_PACK = re.compile(r"^[0-9a-f]{32}$")

FILE, DIR, LINK, HARDLINK = "f", "d", "l", "h"


# Plain classes and NamedTuples, not dataclasses: every restore and save imports this module,
# and `dataclasses` (with the `inspect` it imports) plus class generation cost ~20 ms per run.

class Entry(NamedTuple):
    path: str
    type: str
    mode: int
    size: int
    mtime_ns: int
    digest: str  # content hash, link target, or "" for directories
    link_root: str = ""  # a hard link to a file of another root (format 3): that root's name

    def to_list(self):
        out = [self.path, self.type, self.mode, self.size, self.mtime_ns, self.digest]
        return out + [self.link_root] if self.link_root else out


class Root:
    def __init__(self, name: str, path: str, entries: list[Entry] | None = None, merge: bool = False):
        self.name = name              # "target", "build" or "cargo_home"
        self.path = path              # absolute path at save time
        self.entries = entries if entries is not None else []
        self.merge = merge            # restore only adds/updates (shared $CARGO_HOME), never removes


class Manifest:
    def __init__(self, *, key: str, created_ns: int, workspace_root: str, cargo_home: str, rsnap_version: str,
                 key_inputs: dict, roots: list[Root], sources: list[list], source_dirs: list[str],
                 blobs: dict[str, list], chunks: dict[str, list[str]] | None = None, format: int = FORMAT_VERSION,
                 source_links: list[list] | None = None, rustc_info: dict | None = None):
        self.key, self.created_ns, self.rsnap_version, self.format = key, created_ns, rsnap_version, format
        self.workspace_root, self.cargo_home, self.key_inputs = workspace_root, cargo_home, key_inputs
        self.roots, self.sources, self.source_dirs = roots, sources, source_dirs
        self.blobs = blobs
        self.chunks = chunks if chunks is not None else {}
        self.source_links = source_links if source_links is not None else []
        self.rustc_info = rustc_info if rustc_info is not None else {}  # rsnap.cargo.rustc_info

    def root(self, name: str) -> Root | None:
        return next((r for r in self.roots if r.name == name), None)

    def total_size(self) -> int:
        return sum(e.size for r in self.roots for e in r.entries if e.type == FILE)

    def file_count(self) -> int:
        return sum(1 for r in self.roots for e in r.entries if e.type == FILE)


def written_format(m: Manifest) -> int:
    """The lowest format that holds `m`: older rsnap reads what it can."""
    cross = any(e.link_root for r in m.roots for e in r.entries)
    return FORMAT_VERSION if cross else min(m.format, 2)


def dumps(m: Manifest) -> bytes:
    doc = {
        "format": written_format(m), "rsnap_version": m.rsnap_version, "key": m.key,
        "created_ns": m.created_ns, "workspace_root": m.workspace_root,
        "cargo_home": m.cargo_home, "key_inputs": m.key_inputs,
        "roots": [{"name": r.name, "path": r.path, "merge": r.merge,
                   "entries": [e.to_list() for e in r.entries]} for r in m.roots],
        "sources": m.sources, "source_dirs": m.source_dirs, "blobs": m.blobs, "chunks": m.chunks,
    }
    if m.source_links:  # optional: rsnap before it ignores the field (and symlinks, as cargo does)
        doc["source_links"] = m.source_links
    if m.rustc_info:  # optional, ignored by rsnap before it: see rsnap.cargo.rustc_info
        doc["rustc_info"] = m.rustc_info
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return zstandard.ZstdCompressor(level=6).compress(raw)


def loads(data: bytes) -> Manifest:
    """Parse and fully validate a manifest; raise FormatError on anything suspicious."""
    doc = _parse(data)
    try:
        return _build(doc)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        raise FormatError(f"snapshot manifest is malformed ({type(e).__name__}: {e})"[:300]) from None


def loads_blob_tables(data: bytes) -> tuple[dict[str, list], dict[str, list[str]]]:
    """Only the blob and chunk tables of a manifest, validated (what a save dedupes against)."""
    doc = _parse(data)
    try:
        blobs = _check_blobs(doc["blobs"])
        return blobs, _check_chunks(doc.get("chunks", {}), blobs)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        raise FormatError(f"snapshot manifest is malformed ({type(e).__name__}: {e})"[:300]) from None


def _parse(data: bytes) -> dict:
    """Decompress and parse a manifest; check it is an object of a format this rsnap reads."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_MANIFEST_BYTES)
        doc = json.loads(raw)
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError, RecursionError, MemoryError) as e:
        raise FormatError(f"snapshot manifest is corrupt ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise FormatError("snapshot manifest is not an object")
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise FormatError("snapshot manifest has no valid format version")
    if fmt > FORMAT_VERSION:
        raise NewerFormatError(
            f"snapshot was written by a newer rsnap (format {fmt}, this rsnap reads {FORMAT_VERSION}); upgrade rsnap")
    return doc


def _check_blobs(blobs) -> dict[str, list]:
    _require(isinstance(blobs, dict), "blobs must be an object")
    for digest, loc in blobs.items():
        _require(_DIGEST.match(digest), f"bad blob digest {digest!r}")
        _require(isinstance(loc, list) and len(loc) == 4, "bad blob location")
        pack, off, clen, size = loc
        _require(isinstance(pack, str) and _PACK.match(pack), "bad pack id")
        for n in (off, clen, size):
            _require(isinstance(n, int) and 0 <= n <= MAX_FILE_SIZE, "bad blob offset or size")
    return blobs


def _check_chunks(chunks, blobs: dict[str, list]) -> dict[str, list[str]]:
    _require(isinstance(chunks, dict), "chunks must be an object")
    for digest, parts in chunks.items():
        _require(_DIGEST.match(digest), f"bad chunked file digest {digest!r}")
        _require(isinstance(parts, list) and parts, f"bad chunk list for {digest}")
        for part in parts:
            _require(isinstance(part, str) and part in blobs, f"chunk of {digest} has no blob")
    return chunks


def chunked_size(chunks: list[str], blobs: dict[str, list]) -> int:
    return sum(blobs[c][3] for c in chunks)


def _build(doc: dict) -> Manifest:
    blobs = _check_blobs(doc["blobs"])
    chunks = _check_chunks(doc.get("chunks", {}), blobs)
    chunked_sizes = {digest: chunked_size(parts, blobs) for digest, parts in chunks.items()}
    roots = []
    _require(isinstance(doc["roots"], list), "roots must be a list")
    for r in doc["roots"]:
        name = r["name"]
        _require(name in ("target", "build", "cargo_home"), f"unknown root {name!r}")
        _require(all(o.name != name for o in roots), f"root {name} appears twice")
        _require(bool(r.get("merge")) == (name == "cargo_home"), f"bad merge flag for root {name}")
        _require(isinstance(r["entries"], list), "entries must be a list")
        entries = [_entry(e, blobs, chunked_sizes) for e in r["entries"]]
        _check_tree(name, entries)
        roots.append(Root(name=name, path=str(r["path"]), entries=entries, merge=name == "cargo_home"))
    _check_cross_links(roots)
    sources = doc.get("sources", [])
    _require(isinstance(sources, list), "sources must be a list")
    for s in sources:
        _require(isinstance(s, list) and len(s) == 5, "bad source record")
        path, typ, size, mtime_ns, digest = s
        _check_source_path(path)
        _require(typ in (FILE, DIR) and isinstance(digest, str), f"bad source record for {path}")
        _require(isinstance(size, int) and 0 <= size <= MAX_FILE_SIZE, f"bad source size for {path}")
        _require(isinstance(mtime_ns, int) and 0 <= mtime_ns < 1 << 63, f"bad source mtime for {path}")
    source_dirs = doc.get("source_dirs", [])
    _require(isinstance(source_dirs, list), "source_dirs must be a list")
    for d in source_dirs:
        _check_source_path(d)
    source_links = doc.get("source_links", [])
    _require(isinstance(source_links, list), "source_links must be a list")
    for link in source_links:
        _require(isinstance(link, list) and len(link) == 3, "bad source link record")
        _check_source_path(link[0])
        _check_source_path(link[2])
        _require(isinstance(link[1], str) and 0 < len(link[1]) <= 4096 and "\x00" not in link[1],
                 f"bad source link text for {link[0]}")
    created_ns = doc["created_ns"]
    _require(isinstance(created_ns, int) and 0 <= created_ns < 1 << 63, "bad created_ns")
    return Manifest(
        format=doc["format"], rsnap_version=str(doc.get("rsnap_version", "?")), key=str(doc["key"]),
        created_ns=created_ns, workspace_root=str(doc["workspace_root"]),
        cargo_home=str(doc["cargo_home"]), key_inputs=dict(doc.get("key_inputs", {})),
        roots=roots, sources=sources, source_dirs=source_dirs, blobs=blobs, chunks=chunks,
        source_links=source_links, rustc_info=rustc_info.valid(doc.get("rustc_info", {})),
    )


def _check_tree(root: str, entries: list[Entry]) -> None:
    """Each path once; nothing below a file or a symlink; nothing rsnap or cargo keeps out of snapshots."""
    types: dict[str, str] = {}
    for e in entries:
        _require(e.path not in types, f"path {e.path} appears twice in root {root}")
        types[e.path] = e.type
        if root == "cargo_home":
            _require(any(e.path.startswith(t + "/") for t in CARGO_HOME_TREES) and not is_cargo_home_excluded(e.path),
                     f"{e.path} is not a cargo cache path")
        else:
            _require(not is_excluded_target_path(e.path), f"{e.path} is never part of a snapshot")
    for e in entries:
        if e.type == HARDLINK:
            _require(e.link_root or types.get(e.digest) == FILE, f"hard link {e.path} does not point to a file of root {root}")
            # restore links before fingerprints are written: a link must never be one (save never makes one)
            _require(not is_fingerprint_path(e.path) and not e.path.endswith("/.cargo-ok"),
                     f"hard link {e.path} in place of a fingerprint")
    for path in types:
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            _require(types.get(parent, DIR) == DIR, f"{path} is below a non-directory in root {root}")


def _check_cross_links(roots: list[Root]) -> None:
    """A hard link to another root joins the target dir and a separate build dir, nothing else,
    and points to a file entry of that root."""
    files = {r.name: {e.path for e in r.entries if e.type == FILE} for r in roots}
    for r in roots:
        for e in r.entries:
            if e.link_root:
                _require(e.link_root != r.name and {r.name, e.link_root} == {"target", "build"}
                         and e.digest in files.get(e.link_root, ()),
                         f"hard link {e.path} does not point to a file of root {e.link_root}")


def _check_source_path(path) -> None:
    """Source records: relative to the workspace root (no `..`), or absolute and normalized."""
    _require(isinstance(path, str) and path and "\x00" not in path, "bad source path")
    _require(path == "." or posixpath.normpath(path) == path, f"unnormalized source path {path!r}")
    _require(".." not in path.split("/") and path != "/", f"bad source path {path!r}")


def _entry(raw, blobs: dict, chunked_sizes: dict[str, int]) -> Entry:
    _require(isinstance(raw, list) and (len(raw) == 6 or len(raw) == 7 and raw[1] == HARDLINK), "bad entry")
    path, typ, mode, size, mtime_ns, digest = raw[:6]
    link_root = raw[6] if len(raw) == 7 else ""
    _require(link_root in ("", "target", "build"), f"bad hard link root for {path}")
    check_relpath(path)
    _require(typ in (FILE, DIR, LINK, HARDLINK), f"bad entry type {typ!r} for {path}")
    _require(isinstance(mode, int) and 0 <= mode <= 0o7777, f"bad mode for {path}")
    _require(isinstance(size, int) and 0 <= size <= MAX_FILE_SIZE, f"bad size for {path}")
    _require(isinstance(mtime_ns, int) and 0 <= mtime_ns < 1 << 63, f"bad mtime for {path}")
    _require(isinstance(digest, str), f"bad digest for {path}")
    if typ == FILE and digest in blobs:
        _require(blobs[digest][3] == size, f"size mismatch for {path}")
    elif typ == FILE:
        _require(digest in chunked_sizes, f"no blob for {path}")
        _require(chunked_sizes[digest] == size, f"size mismatch for {path}")
    elif typ == LINK:
        check_link_target(path, digest)
    elif typ == HARDLINK:
        check_relpath(digest)  # the path of a file entry of its root (checked in _check_tree / _check_cross_links)
    return Entry(path, typ, mode & 0o777, size, mtime_ns, digest, link_root)


def check_relpath(path) -> None:
    _require(isinstance(path, str) and path, "empty path")
    _require("\x00" not in path and "\\" not in path, f"bad character in path {path!r}")
    _require(not path.startswith("/"), f"absolute path {path!r} in snapshot")
    _require(posixpath.normpath(path) == path, f"unnormalized path {path!r} in snapshot")
    _require(".." not in path.split("/"), f"path {path!r} escapes its root")


def check_link_target(path: str, target: str) -> None:
    """A symlink must stay inside its root: relative, and not climbing above it."""
    _require(target and not target.startswith("/") and "\x00" not in target,
             f"symlink {path} points outside its root")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    _require(joined != ".." and not joined.startswith("../") and not joined.startswith("/"),
             f"symlink {path} points outside its root")


def _require(cond, message: str) -> None:
    if not cond:
        raise FormatError(f"snapshot manifest rejected: {message}")
