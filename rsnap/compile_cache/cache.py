"""The compile cache behind `rsnap-rustc`: key, path handling, entries, LRU.

Key (xxh3_128 over, in order):
  * a format version;
  * the toolchain digest: `rustc -vV` plus the content of the sysroot's `lib/*.so*`
    (cached per rustc binary in the state dir, keyed by its path, size and mtime);
  * for linked outputs (bins, build scripts, proc-macros): the link environment: the
    linker driver, `ld`, the toolchain's rust-lld and the system start files and
    libraries (`cc -print-file-name=...`), all by content;
  * the arguments with the checkout roots replaced by tokens (below); only
    `--diagnostic-width` and `--color` are dropped (they change how diagnostics are
    drawn, nothing else);
  * every file rustc reads, from rustc's own dep-info (a `--emit=dep-info` pass run with
    `-Z binary-dep-depinfo`, so the crate files of the whole dependency graph are listed,
    not only `--extern`), by content, under its tokenized path; toolchain files are
    covered by the toolchain digest.  Linked outputs hash the `.rlib` next to a listed
    `.rmeta`, because the linker reads the rlib;
  * the values of the `# env-dep:` variables and the CARGO_* / OUT_DIR / RUSTC_BOOTSTRAP
    environment rustc sees, tokenized (cargo's config-only variables such as
    CARGO_MAKEFLAGS, jobs, CARGO_TERM_*, CARGO_PROFILE_* are left out: they reach rustc
    as arguments);
  * `-l static=` archives found on the `-L` paths and a `--target <spec>.json`, by
    content; the host CPU when `-C target-cpu=native` is asked for.

Direct mode.  Everything but the files and env-deps forms a base key.  Each stored
compilation also writes a small manifest under the base key listing (tokenized) the
files and env var names of its dep-info; a lookup first computes the full key from that
list (hashing the files, no rustc call) and only runs the dep-info pass if that misses.
Given the same arguments and environment, rustc reads the same files as long as the
files it read have the same content, so a manifest hit is the key the pass would give;
the one gap is a new file that would make `mod foo;` ambiguous (a compile error rustc
would report; the manifest hit compiles it as before).

Entries: one store object `cache/<k0k1>/<key>` per compilation: magic, xxh3_128 of the
body, zstd body (frame checksum) holding a JSON header (file names, sizes, modes,
stdout/stderr lengths, compile time) and the bytes.  A bad checksum, zstd error or size
mismatch is a corrupt entry: deleted and recompiled.  LRU: hits touch the object; every
SIZE_CHECK_EVERY entries written, one wrapper sums `cache/` and deletes the oldest
objects (mtime) down to 90% of RSNAP_CACHE_SIZE.

Roots.  The paths that differ between checkouts and runners are the workspace root
(cargo's cwd for path crates), `$CARGO_HOME` (registry and git crates: cwd is the
package root `$CARGO_HOME/registry/src/<index>/<name>-<ver>`), the package root of a
path crate outside the workspace, the target dir (from `--out-dir`) and the sysroot.
In the key, in dep-info and in stored stdout/stderr they become tokens such as
`@RSNAP:CWD@`; on restore the tokens become this runner's paths, so the restored `.d`
file names this checkout's sources and cargo's artifact notifications name this
target dir.

Debuginfo and other embedded paths: DECISION = remap.  Every cached compilation is run
with `--remap-path-prefix` for the roots (cargo's `trim-paths` convention, RFC 3127):
the workspace root becomes `.`, a registry/git/outside package root becomes
`<name>-<version>`, `$CARGO_HOME` `/rsnap/cargo-home`, the target dir `/rsnap/target`.
Workspace crates are given to rustc with relative paths, so for them only
DW_AT_comp_dir changes (`.`); for dependencies, panic locations, `file!()` and debuginfo
read `serde-1.0.200/src/de.rs` instead of `/home/u/.cargo/registry/src/<index>/serde-
1.0.200/src/de.rs`.  Diagnostics are remapped the same way (scope "all": a narrower
scope makes rustc keep the local path in the .rmeta).  The remap is applied on every
miss, so a hit restores exactly the bytes the miss produced on any runner (checked:
rlib, rmeta, proc-macro .so and build-script binaries are byte-identical when compiled
at two different checkout and CARGO_HOME paths).  Debuggers find dependency sources with
`set substitute-path`; the remapped output differs from a plain build without the
wrapper only in these path strings.

What the remap cannot reach (a literal `env!("CARGO_MANIFEST_DIR")`, a generated file
that spells out OUT_DIR, ...) is caught after the miss: outputs other than the `.d` file
are scanned for the real root paths, and when one is found the entry is stored under a
path key (the normal key plus the real roots) with a small marker under the normal key.
Such crates hit only at the same paths, and never restore another checkout's path.

Not covered (same as cargo and sccache): files or environment variables that a
proc-macro or `include!`-less code reads behind rustc's back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import xxhash
import zstandard

from .. import faults
from . import stats as wrapper_stats
from .cache_key import (PHASES, CorruptEntry, Prepared, Uncacheable, depinfo_pass, env_dep_names, hash_strings,
                        prepare)
from .rustc_call import Invocation, exec_rustc, log_event

ENTRY_MAGIC = b"RSNAPCE1"
SIZE_CHECK_EVERY = 32     # entries written between two LRU size checks
EVICT_TO = 0.9            # evict down to this fraction of RSNAP_CACHE_SIZE


def pack_entry(header: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    payload = b"".join([len(head).to_bytes(4, "little"), head, *blobs])
    body = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(payload)
    return ENTRY_MAGIC + xxhash.xxh3_128_digest(body) + body


def unpack_entry(data: bytes) -> tuple[dict, bytes]:
    if len(data) < len(ENTRY_MAGIC) + 16 or not data.startswith(ENTRY_MAGIC):
        raise CorruptEntry("bad magic or truncated")
    digest, body = data[len(ENTRY_MAGIC):len(ENTRY_MAGIC) + 16], data[len(ENTRY_MAGIC) + 16:]
    if xxhash.xxh3_128_digest(body) != digest:
        raise CorruptEntry("checksum mismatch")
    try:
        payload = zstandard.ZstdDecompressor().decompress(body)
        n = int.from_bytes(payload[:4], "little")
        header = json.loads(payload[4:4 + n])
    except (zstandard.ZstdError, ValueError) as e:
        raise CorruptEntry(str(e)) from None
    blob = payload[4 + n:]
    expected = sum(f["size"] for f in header.get("files", ())) + header.get("stdout", 0) + header.get("stderr", 0)
    if len(blob) != expected:
        raise CorruptEntry("size mismatch")
    return header, blob


def marker_entry() -> bytes:
    return pack_entry({"kind": "path-dependent"}, [])


def object_name(key: str) -> str:
    return f"cache/{key[:2]}/{key}"


def run_rustc_teed(cmd: list[str]) -> tuple[int, bytes, bytes]:
    """Run rustc, forwarding its output as it comes (cargo starts dependents on the
    .rmeta artifact notification) while keeping a copy for the cache entry."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=False)
    captured = {1: [], 2: []}

    def pump(pipe, fd):
        while chunk := os.read(pipe.fileno(), 65536):
            captured[fd].append(chunk)
            os.write(fd, chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, 1)), threading.Thread(target=pump, args=(proc.stderr, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return proc.wait(), b"".join(captured[1]), b"".join(captured[2])


def write_output(path: str, data: bytes, mode: int) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".rsnap-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode & 0o7777)
        faults.point("cache.output")   # a hit's output written under its temp name
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def warn(message: str, consequence: str = "compiling without the cache") -> None:
    sys.stderr.write(f"rsnap-rustc: warning: {message}; {consequence}\n")
    sys.stderr.flush()


def compile_cached(inv: Invocation) -> int:
    store_url = wrapper_stats.resolve_store_url()
    started = time.monotonic()
    PHASES.mark("import")
    try:
        prep = prepare(inv)
    except Uncacheable as e:
        pass_through(store_url, inv, e.reason)
    except Exception as e:  # noqa: BLE001 - never fail a build because of the cache
        warn(f"cannot compute the cache key ({type(e).__name__}: {e})")
        pass_through(store_url, inv, "key-error")

    try:
        from ..store import open_store

        store = open_store(store_url)
    except Exception as e:  # noqa: BLE001
        warn(f"store {store_url} unavailable ({e})")
        store_error(store_url, inv)

    counts = {"requests": 1}
    try:
        hit = lookup(store, prep, counts, started)
    except Uncacheable as e:
        pass_through(store_url, inv, e.reason)
    except Exception as e:  # noqa: BLE001
        warn(f"cache lookup failed ({type(e).__name__}: {e})")
        store_error(store_url, inv)
    if hit:
        wrapper_stats.update(store_url, counts)
        log_event("hit", inv, str(PHASES))
        return 0
    return compile_and_store(store, store_url, prep, counts)


def pass_through(store_url: str, inv: Invocation, reason: str) -> None:  # never returns: execs rustc
    wrapper_stats.update(store_url, {"requests": 1, "non_cacheable": 1}, ("non_cacheable_reasons", reason))
    log_event("pass", inv, reason)
    exec_rustc(inv.rustc, inv.args)


def store_error(store_url: str, inv: Invocation) -> None:  # never returns: execs rustc
    wrapper_stats.update(store_url, {"requests": 1, "errors_store": 1})
    log_event("store-error", inv)
    exec_rustc(inv.rustc, inv.args)


def lookup(store, prep: Prepared, counts: dict, started: float) -> bool:
    """Direct mode first: the manifest of the last compilation with the same base key lists
    the files and env vars rustc read, so the full key needs no rustc call.  If that
    misses (or there is no manifest), ask rustc (the dep-info pass) and look up again."""
    listed = read_manifest(store, prep)
    if listed is not None:
        try:
            prep.key = prep.full_key(*listed)
        except Uncacheable:  # a listed file is gone: the compilation reads other files now
            prep.key = None
        PHASES.mark("direct-key")
        if prep.key and try_restore(store, prep, counts, started):
            counts["hits_direct"] = 1
            return True
    files, env_deps = depinfo_pass(prep.inv)
    PHASES.mark("depinfo")
    prep.inputs = (files, env_dep_names(env_deps))
    key = prep.full_key(*prep.inputs)
    PHASES.mark("hash-files")
    if key == prep.key:
        return False  # already looked up
    prep.key = key
    if try_restore(store, prep, counts, started):
        write_manifest(store, prep)  # the old manifest listed other files: replace it
        return True
    return False


def manifest_name(prep: Prepared) -> str:
    return object_name(hash_strings(["manifest", prep.base_key]))


def read_manifest(store, prep: Prepared) -> tuple[list[str], list[str]] | None:
    name = manifest_name(prep)
    data = _get(store, name)
    if data is None:
        return None
    try:
        header, _ = unpack_entry(data)
        files = [prep.roots.detokenize(p) for p in header["inputs"]]
        return files, header["env_names"]
    except (CorruptEntry, KeyError, TypeError):
        store.delete(name)
        return None


def write_manifest(store, prep: Prepared) -> int:
    files, env_names = prep.inputs
    data = pack_entry({"kind": "manifest", "inputs": [prep.roots.tokenize(f) for f in files],
                       "env_names": env_names, "crate": prep.inv.crate_name}, [])
    store.put(manifest_name(prep), data)
    return len(data)


def try_restore(store, prep: Prepared, counts: dict, started: float) -> bool:
    name = object_name(prep.key)
    data = _get(store, name)
    if data is None:
        return False
    try:
        header, blob = unpack_entry(data)
        if header.get("kind") == "path-dependent":
            name = object_name(prep.path_key())
            counts["bytes_read"] = len(data)
            data = _get(store, name)
            if data is None:
                return False
            header, blob = unpack_entry(data)
        PHASES.mark("fetch")
        restore_entry(prep, header, blob)
        PHASES.mark("restore")
    except CorruptEntry as e:
        sys.stderr.write(f"rsnap-rustc: warning: corrupt cache entry {name} ({e}); deleted, recompiling\n")
        store.delete(name)
        counts["errors_corrupt"] = 1
        return False
    store.touch(name)
    elapsed = time.monotonic() - started
    counts.update(hits=1, bytes_read=counts.get("bytes_read", 0) + len(data), hit_time_s=elapsed,
                  time_saved_s=max(0.0, header.get("compile_s", 0.0) - elapsed))
    return True


def _get(store, name: str) -> bytes | None:
    if not store.exists(name):
        return None
    from ..errors import StoreError

    try:
        return store.get(name)
    except StoreError:
        if not store.exists(name):  # evicted between the two calls
            return None
        raise


def restore_entry(prep: Prepared, header: dict, blob: bytes) -> None:
    out_dir = prep.inv.value("--out-dir")
    files, pos = [], 0
    for f in header["files"]:
        data = blob[pos:pos + f["size"]]
        pos += f["size"]
        if f.get("tokens"):
            data = prep.roots.detokenize_bytes(data)
        files.append((f["name"], data, f["mode"]))
    if sorted(name for name, _, _ in files) != prep.outputs:
        raise CorruptEntry("entry does not hold the expected outputs")
    stdout = prep.roots.detokenize_bytes(blob[pos:pos + header["stdout"]])
    stderr = prep.roots.detokenize_bytes(blob[pos + header["stdout"]:])
    os.makedirs(out_dir, exist_ok=True)
    for name, data, mode in files:
        write_output(os.path.join(out_dir, name), data, mode)
    # replay after the files exist: cargo acts on the artifact notifications
    for fd, data in ((1, stdout), (2, stderr)):
        if data:
            os.write(fd, data)


def compile_and_store(store, store_url: str, prep: Prepared, counts: dict) -> int:
    inv = prep.inv
    t0 = time.monotonic()
    try:
        code, stdout, stderr = run_rustc_teed([inv.rustc, *prep.roots.remap_args(), *inv.args])
    except OSError as e:
        sys.stderr.write(f"rsnap-rustc: cannot run {inv.rustc}: {e.strerror}\n")
        return 127
    compile_s = time.monotonic() - t0
    PHASES.mark("compile")
    counts.update(misses=1, compile_time_s=compile_s)
    detail = ""
    if code == 0:
        try:
            detail = store_entry(store, prep, stdout, stderr, compile_s, counts)
        except Exception as e:  # noqa: BLE001
            warn(f"cannot store the result ({type(e).__name__}: {e})", "the build goes on")
            counts["errors_store"] = counts.get("errors_store", 0) + 1
    PHASES.mark("store")
    stats = wrapper_stats.update(store_url, counts)
    log_event("miss", inv, ",".join(filter(None, [detail, str(PHASES)])))
    if counts.get("entries_written") and stats.get("writes_since_size_check", 0) >= SIZE_CHECK_EVERY:
        try:
            evict(store, store_url)
        except Exception as e:  # noqa: BLE001
            sys.stderr.write(f"rsnap-rustc: warning: cache eviction failed: {e}\n")
    return code


def store_entry(store, prep: Prepared, stdout: bytes, stderr: bytes, compile_s: float, counts: dict) -> str:
    out_dir = prep.inv.value("--out-dir")
    files, blobs, embedded = [], [], None
    for name in prep.outputs:
        path = os.path.join(out_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        is_depinfo = name.endswith(".d")
        if is_depinfo:
            data = prep.roots.tokenize_bytes(data)
        else:
            embedded = embedded or prep.roots.embedded_in(data)
        files.append({"name": name, "size": len(data), "mode": os.stat(path).st_mode & 0o777, "tokens": is_depinfo})
        blobs.append(data)
    stdout, stderr = prep.roots.tokenize_bytes(stdout), prep.roots.tokenize_bytes(stderr)
    header = {"kind": "output", "files": files, "stdout": len(stdout), "stderr": len(stderr),
              "compile_s": round(compile_s, 4), "crate": prep.inv.crate_name}
    entry = pack_entry(header, [*blobs, stdout, stderr])
    written = 0
    if embedded:
        marker = marker_entry()
        store.put(object_name(prep.key), marker)
        faults.point("cache.marker")   # the marker names an entry not yet written
        store.put(object_name(prep.path_key()), entry)
        written = len(marker) + len(entry)
        counts["misses_path_dependent"] = 1
    else:
        store.put(object_name(prep.key), entry)
        written = len(entry)
    faults.point("cache.entry")   # the entry is stored, its direct-mode manifest not yet
    written += write_manifest(store, prep)
    counts.update(bytes_written=written, entries_written=1, writes_since_size_check=1)
    return f"path-dependent:{embedded}" if embedded else ""


def evict(store, store_url: str) -> None:
    """Drop the least recently used entries (oldest mtime; hits touch) above the limit."""
    import fcntl

    lock_dir = wrapper_stats.store_state_dir(store_url)
    with open(os.path.join(lock_dir, "evict.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another wrapper is already evicting
        wrapper_stats.set_values(store_url, {"writes_since_size_check": 0})
        limit = wrapper_stats.cache_size_limit()
        objects = store.stat_all("cache/")
        total = sum(size for _, size, _ in objects)
        evicted = freed = 0
        if total > limit:
            for name, size, _mtime in sorted(objects, key=lambda o: o[2]):
                if total - freed <= limit * EVICT_TO:
                    break
                store.delete(name)
                evicted += 1
                freed += size
        wrapper_stats.update(store_url, {"evicted_entries": evicted, "evicted_bytes": freed})
        wrapper_stats.set_values(store_url, {"cache_size_bytes": total - freed, "cache_entries": len(objects) - evicted})
