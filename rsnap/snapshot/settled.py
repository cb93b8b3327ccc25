"""Persistent runners: restoring a snapshot onto the target dir that already holds it.

At the end of a restore or save, `record` writes `<target>/.rsnap/settled`: the snapshot the roots
on disk now equal, the xxh3-128 of its manifest's bytes, and per root the lstat of every entry the
plan would walk (the root itself and every dir, file and symlink below it: st_mode, size,
mtime_ns, inode, ctime_ns, device). A root is recorded only when every entry of the snapshot is
verifiably on disk as the manifest says: a file's stat cache record (size, mtime, inode, ctime ->
digest) matches both its stat now and the manifest's digest, a hard link shares its file's inode,
dirs and symlinks have the manifest's mode, mtime and link text, and (not for merge roots) nothing
else is there. Otherwise the root is left out and planned in full next time.

At restore, `settled_roots` lstat()s every recorded entry of a root whose snapshot and manifest
digest are the ones now being restored. If every stat is equal, the root is still exactly as
recorded: any write, truncation, chmod, utime or rename moves a file's ctime (which user space
cannot set back) or replaces its inode, and adding, removing or renaming an entry moves its
parent dir's mtime and ctime. Such a root needs no walk, no hashing, no writes and no stat cache
rewrite. Any difference, a missing record or another snapshot: the full plan, which compares
content (through the stat cache, or by hashing).

`read_manifest` skips re-validating a manifest whose bytes hash to the recorded digest: this
machine validated (restore) or wrote (save) exactly those bytes when it made the record.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import xxhash
import zstandard

from .. import __version__
from ..cargo.layout import RSNAP_DIR
from ..repository import manifest as mf
from . import scan

SETTLED_FILE = "settled"
ABSENT = "absent"
_IFREG_TEST = stat.S_IFMT(0o177777)  # the file type bits
_TYPE_BITS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}
_VERSION = 1


def _state_path(ws) -> Path:
    return Path(ws.target_dir) / RSNAP_DIR / SETTLED_FILE


def _key(st: os.stat_result) -> list:
    """What is compared: type and mode, size (files only), mtime, inode, ctime, device."""
    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return [st.st_mode, size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]


def manifest_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def load(ws) -> dict | None:
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(_state_path(ws).read_bytes(),
                                                                 max_output_size=1 << 31))
    except (OSError, ValueError, zstandard.ZstdError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != _VERSION or doc.get("rsnap") != __version__:
        return None
    return doc


def forget(ws) -> None:
    """Drop the record (before anything in the roots is changed by rsnap)."""
    try:
        _state_path(ws).unlink()
    except OSError:
        pass


def _write(ws, doc: dict) -> None:
    path = _state_path(ws)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SETTLED_FILE}.tmp-{os.getpid()}")
        tmp.write_bytes(zstandard.ZstdCompressor(level=1).compress(json.dumps(doc, separators=(",", ":")).encode()))
        os.replace(tmp, path)
    except OSError:
        pass  # only saves time


# ---------------------------------------------------------------- reading the manifest

def read_manifest(store, name: str, ws) -> mf.Manifest:
    """The manifest `name`, validated unless its bytes are those this target dir was settled
    from (validated or written here before). Carries `raw_digest` for `record`."""
    data = store.get(name)
    digest = manifest_digest(data)
    doc = load(ws)
    if doc is not None and doc.get("snapshot") == name and doc.get("manifest") == digest:
        try:
            m = _loads_trusted(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            m = mf.loads(data)
    else:
        m = mf.loads(data)
    m.raw_digest, m.settled_doc = digest, doc
    return m


def _loads_trusted(data: bytes) -> mf.Manifest:
    doc = mf._parse(data)
    Entry = mf.Entry
    roots = [mf.Root(name=r["name"], path=str(r["path"]), merge=r["name"] == "cargo_home",
                     entries=[Entry(p, t, mode & 0o777, size, mt, d) for p, t, mode, size, mt, d in r["entries"]])
             for r in doc["roots"]]
    return mf.Manifest(
        format=doc["format"], rsnap_version=str(doc.get("rsnap_version", "?")), key=str(doc["key"]),
        created_ns=doc["created_ns"], workspace_root=str(doc["workspace_root"]), cargo_home=str(doc["cargo_home"]),
        key_inputs=dict(doc.get("key_inputs", {})), roots=roots, sources=doc.get("sources", []),
        source_dirs=doc.get("source_dirs", []), blobs=doc["blobs"], chunks=doc.get("chunks", {}),
        source_links=doc.get("source_links", []), rustc_info=doc.get("rustc_info", {}))


# ---------------------------------------------------------------- restore: which roots are settled

def settled_roots(ws, name: str, m: mf.Manifest, paths: dict[str, Path]) -> dict[str, dict]:
    """The records of the roots of `m` that are on disk exactly as recorded after `name` was last
    restored or saved here (see the module doc), by root name; `paths`: root name -> its path now."""
    doc = m.settled_doc if hasattr(m, "settled_doc") else load(ws)
    digest = getattr(m, "raw_digest", None)
    if doc is None or digest is None or doc.get("snapshot") != name or doc.get("manifest") != digest:
        return {}
    out = {}
    try:
        for root in m.roots:
            rec = doc["roots"].get(root.name)
            if rec is not None and rec.get("path") == str(paths[root.name]) and _unchanged(str(paths[root.name]), rec):
                out[root.name] = rec
    except (KeyError, TypeError, AttributeError):
        return {}
    return out


def _unchanged(root: str, rec: dict) -> bool:
    lstat = os.lstat
    try:
        for rel, key in rec["stats"].items():
            if key == ABSENT:
                if os.path.lexists(f"{root}/{rel}"):
                    return False
                continue
            st = lstat(f"{root}/{rel}" if rel else root)
            if [st.st_mode, st.st_size if st.st_mode & _IFREG_TEST == stat.S_IFREG else 0, st.st_mtime_ns,
                    st.st_ino, st.st_ctime_ns, st.st_dev] != key:
                return False
    except (OSError, TypeError, ValueError, AttributeError):
        return False
    return True


# ---------------------------------------------------------------- recording

def record(ws, name: str, m: mf.Manifest, specs: dict, caches: dict[str, scan.StatCache],
           keep: dict[str, dict] | None = None, found: dict[str, list] | None = None,
           absent: dict[str, set[str]] | None = None) -> None:
    """Write the settled record for snapshot `name` (manifest `m`, which carries `raw_digest`).
    `specs`: root name -> RootSpec; `caches`: root name -> its stat cache as just written;
    `keep`: records of roots known unchanged (settled this restore), reused as they are;
    `found`: root name -> the walk the manifest was made from (a save), else the roots are walked;
    `absent`: root name -> entries a partial restore left out (rsnap.snapshot.partial), recorded as
    absent: the root is settled while they stay absent (a restore would leave them out again)."""
    digest = getattr(m, "raw_digest", None)
    if digest is None:
        forget(ws)
        return
    roots = {}
    for root in m.roots:
        spec = specs.get(root.name)
        if keep and root.name in keep:
            roots[root.name] = keep[root.name]
        elif spec is not None and root.name in caches:
            rec = _record_root(spec, root, caches[root.name], (found or {}).get(root.name),
                               (absent or {}).get(root.name, set()), {n: sp.path for n, sp in specs.items()})
            if rec is not None:
                roots[root.name] = rec
    _write(ws, {"version": _VERSION, "rsnap": __version__, "snapshot": name, "manifest": digest, "roots": roots})


def _record_root(spec, root: mf.Root, cache: scan.StatCache, found: list | None, absent: set[str],
                 paths: dict) -> dict | None:
    """The expected stat of every path of a root that is verifiably as the manifest says, or None.
    A file's expected stat is its stat cache record, which maps exactly that stat to the manifest's
    digest (the cache's own trust rule); if the file changed since, its stat differs and the next
    restore plans the root in full."""
    path = str(spec.path)
    try:
        top = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(top.st_mode):
        return None
    dev = top.st_dev
    stats: dict = {"": _key(top)}
    for sub in spec.subtrees:
        if sub:
            try:
                stats[sub] = _key(os.lstat(f"{path}/{sub}"))
            except FileNotFoundError:
                stats[sub] = ABSENT  # a subtree that is absent must stay absent
            except OSError:
                return None
    walked = {f.rel: f for f in (found if found is not None else scan.walk(spec.path, spec.subtrees, spec.exclude))}
    left_out = 0
    for e in root.entries:
        f = walked.get(e.path)
        if f is None and e.path in absent:
            stats[e.path] = ABSENT
            left_out += 1
            continue
        if f is None:
            return None
        if e.type == mf.FILE:
            rec = cache.files.get(e.path)
            if f.type != "f" or f.mode != e.mode or not rec or rec[4] != e.digest or rec[0] != e.size \
                    or rec[1] != e.mtime_ns or rec[2] != f.ino:
                return None
            stats[e.path] = [stat.S_IFREG | f.mode, rec[0], rec[1], rec[2], rec[3], dev]
            continue
        if e.type == mf.HARDLINK and e.link_root:  # into another root (the build dir)
            try:
                st = os.lstat(f"{paths[e.link_root]}/{e.digest}")
                ok = f.type == "f" and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, f.ino)
            except (OSError, KeyError):
                ok = False
        elif e.type == mf.HARDLINK:
            first = walked.get(e.digest)
            ok = f.type == "f" and first is not None and first.type == "f" and f.ino == first.ino
        elif e.type == mf.DIR:
            ok = f.type == "d" and f.mtime_ns == e.mtime_ns and f.mode == e.mode
        else:
            ok = e.type == mf.LINK and f.type == "l" and f.link == e.digest
        if not ok:
            return None
        stats[e.path] = _found_key(f, dev)
    if not root.merge and len(walked) != len(root.entries) - left_out:
        return None  # something the snapshot lacks: restore would remove it
    for rel, f in walked.items():
        if rel not in stats:
            stats[rel] = _found_key(f, dev)  # a merge root's own extras: restore leaves them alone
    return {"path": path, "stats": stats}


def _found_key(f: scan.Found, dev: int) -> list:
    return [_TYPE_BITS[f.type] | (0o777 if f.type == "l" else f.mode), f.size if f.type == "f" else 0,
            f.mtime_ns, f.ino, f.ctime_ns, dev]


def retimed(recs: dict[str, dict], changes: list) -> None:
    """Arming moved these files' ctimes ((path, stat before, stat after), rsnap.cargo.usage.arm):
    move their recorded stats along when they were recorded as they were just before."""
    for path, before, after in changes:
        for rec in recs.values():
            prefix = rec["path"] + "/"
            if path.startswith(prefix):
                rel = path[len(prefix):]
                if rec["stats"].get(rel) == _key(before) and (before.st_ino, before.st_size, before.st_mtime_ns) == (
                        after.st_ino, after.st_size, after.st_mtime_ns):
                    rec["stats"][rel] = _key(after)
                else:
                    rec["stats"][rel] = None  # never matches: the root is planned in full
