"""Counters of the `rsnap-rustc` compile cache, kept per store in a small local JSON file.

The wrapper runs once per rustc call, so updating the counters must be cheap: one
flock'd read-modify-write of `<state dir>/stores/<store id>/stats.json` (no store
access, no scan).  `show_stats` is what `rsnap stats [--json] [--zero]` prints.

State dir: `$RSNAP_STATE_DIR`, else `$XDG_STATE_HOME/rsnap`, else `~/.local/state/rsnap`.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import zlib

COUNTERS = (
    "requests",            # every call of the wrapper
    "non_compilation",     # -vV, --print ...: not a compilation at all
    "non_cacheable",       # compilations passed through, see non_cacheable_reasons
    "hits",
    "hits_direct",         # hits found from a manifest, without the dep-info pass
    "misses",
    "misses_path_dependent",  # misses whose output embeds a checkout path (keyed on it)
    "errors_store",        # store unreachable / failed: compiled without the cache
    "errors_corrupt",      # corrupt entries detected, deleted and recompiled
    "bytes_read",
    "bytes_written",
    "entries_written",
    "evicted_entries",
    "evicted_bytes",
    "writes_since_size_check",
)
FLOATS = ("time_saved_s", "compile_time_s", "hit_time_s")


def state_dir() -> str:
    d = os.environ.get("RSNAP_STATE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "rsnap")


def resolve_store_url(url: str | None = None) -> str:
    """The store URL the wrapper works on (the registry imports nothing heavy: the wrapper's
    pass-through path must stay light). A remote store (e.g. s3://) is never used
    by a rustc call directly: the wrapper works on the local tier ($RSNAP_LOCAL_STORE, else
    the default local store), which `rsnap restore` fills from the remote store's cache/
    objects and `rsnap save` uploads from (rsnap.store.tiered, docs/compile-cache.md)."""
    from ..store.registry import default_store_url, is_remote
    url = url or os.environ.get("RSNAP_STORE")
    if url and is_remote(url):
        url = os.environ.get("RSNAP_LOCAL_STORE")
    if not url:
        url = default_store_url()
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url


def store_state_dir(store_url: str | None = None) -> str:
    url = resolve_store_url(store_url)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", url).strip("_")[-60:]
    return os.path.join(state_dir(), "stores", f"{safe}-{zlib.crc32(url.encode()):08x}")


def _empty() -> dict:
    stats = {name: 0 for name in COUNTERS}
    stats.update({name: 0.0 for name in FLOATS})
    stats["non_cacheable_reasons"] = {}
    stats["non_compilation_reasons"] = {}
    stats["cache_size_bytes"] = None
    stats["cache_entries"] = None
    return stats


def _load(f) -> dict:
    f.seek(0)
    raw = f.read()
    stats = _empty()
    if raw:
        try:
            stats.update(json.loads(raw))
        except ValueError:
            pass  # a torn write (crash mid-update): start over rather than fail a build
    return stats


def _save(f, stats: dict) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(stats, sort_keys=True).encode())
    f.flush()


def _open_locked(store_url: str | None):
    d = store_state_dir(store_url)
    os.makedirs(d, exist_ok=True)
    f = open(os.path.join(d, "stats.json"), "a+b")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def update(store_url: str | None, counts: dict | None = None, reason: tuple[str, str] | None = None) -> dict:
    """Add `counts` ({counter: delta}) and one `reason` (table, name) to the stats; returns them.

    Never raises: losing a counter is better than failing a compilation."""
    try:
        with _open_locked(store_url) as f:
            stats = _load(f)
            for name, delta in (counts or {}).items():
                stats[name] = (stats.get(name) or 0) + delta
            if reason:
                table = stats.setdefault(reason[0], {})
                table[reason[1]] = table.get(reason[1], 0) + 1
            _save(f, stats)
            return stats
    except OSError:
        return _empty()


def set_values(store_url: str | None, values: dict) -> None:
    try:
        with _open_locked(store_url) as f:
            stats = _load(f)
            stats.update(values)
            _save(f, stats)
    except OSError:
        pass


def read(store_url: str | None = None) -> dict:
    path = os.path.join(store_state_dir(store_url), "stats.json")
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            return _load(f)
    except FileNotFoundError:
        return _empty()


def show_stats(store_url: str | None = None, as_json: bool = False, zero: bool = False) -> dict:
    """Stats of the compile cache in `store_url`, with the current cache size measured from
    the store.  `zero` resets the counters after reading them (like `sccache --zero-stats`).
    `as_json` is accepted for the CLI's convenience; the dict is the same either way."""
    stats = read(store_url)
    stats["store"] = resolve_store_url(store_url)
    try:
        from ..store import open_store

        objects = open_store(stats["store"], create=False).stat_all("cache/")
        stats["cache_entries"] = len(objects)
        stats["cache_size_bytes"] = sum(size for _name, size, _mtime in objects)
    except Exception:  # noqa: BLE001 - a missing or broken store still has local counters
        pass
    stats["cache_size_limit_bytes"] = cache_size_limit()
    if zero:
        try:
            with _open_locked(store_url) as f:
                _save(f, _empty())
        except OSError:
            pass
    return stats


def cache_size_limit() -> int:
    return parse_size(os.environ.get("RSNAP_CACHE_SIZE") or "10G")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 500M, 10G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_stats(stats: dict) -> str:
    """Human-readable table like `sccache --show-stats`."""
    cacheable = stats["hits"] + stats["misses"]
    rate = f"{100.0 * stats['hits'] / cacheable:.1f} %" if cacheable else "-"
    rows = [
        ("Compile requests", stats["requests"]),
        ("Cache hits", stats["hits"]),
        ("  of which without a dep-info pass", stats.get("hits_direct", 0)),
        ("Cache misses", stats["misses"]),
        ("  of which path-dependent", stats["misses_path_dependent"]),
        ("Cache hit rate", rate),
        ("Non-cacheable compilations", stats["non_cacheable"]),
        ("Non-compilation calls", stats["non_compilation"]),
        ("Store errors (compiled without cache)", stats["errors_store"]),
        ("Corrupt entries recompiled", stats["errors_corrupt"]),
        ("Bytes read from cache", _human_bytes(stats["bytes_read"])),
        ("Bytes written to cache", _human_bytes(stats["bytes_written"])),
        ("Time saved by hits", f"{stats['time_saved_s']:.2f} s"),
        ("Time compiling misses", f"{stats['compile_time_s']:.2f} s"),
        ("Entries evicted", stats["evicted_entries"]),
        ("Cache size", _human_bytes(stats.get("cache_size_bytes"))),
        ("Cache entries", "-" if stats.get("cache_entries") is None else stats["cache_entries"]),
        ("Max cache size", _human_bytes(stats.get("cache_size_limit_bytes"))),
    ]
    lines = [f"Store                                  {stats.get('store', '-')}"]
    lines += [f"{label:<38} {value}" for label, value in rows]
    for title, key in (("Non-cacheable reasons:", "non_cacheable_reasons"),
                       ("Non-compilation calls:", "non_compilation_reasons")):
        table = stats.get(key) or {}
        if table:
            lines.append(title)
            lines += [f"  {name:<36} {count}" for name, count in sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)
