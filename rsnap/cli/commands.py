"""The bodies of `rsnap restore` and `rsnap save`, free of any CLI framework.

Both the typer CLI (rsnap/cli/app.py) and the fast argv path (rsnap/cli/entry.py) call these:
restore and save run in every CI job, so they must not pay typer's start-up.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .. import timings
from ..cargo import key_record, keys, prefetch
from ..cargo.layout import discover, RSNAP_DIR
from ..errors import FormatError, NewerFormatError, RsnapError, StoreError, TransientStoreError, EXIT_USAGE
from ..progress import human_bytes
from ..snapshot.restore import restore as restore_snapshot
from ..snapshot.roots import arm_usage, locked, restore_interrupted
from ..snapshot.settled import read_manifest
from ..store import default_store_url, open_store
from ..repository import repo


def emit(as_json: bool, data: dict, text: str, quiet: bool = False) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    elif not quiet:
        sys.stderr.write(text.rstrip() + "\n")


def key_and_inputs(ws, key: str | None):
    inputs = keys.key_inputs(ws)
    return (keys.validate_key(key) if key else keys.default_key(inputs)), inputs


def _discover(manifest_path: str | None, with_deps: bool = False):
    """cargo metadata, with `rustc -vV` for the key running alongside (rsnap.cargo.prefetch)."""
    prefetch.start_discovery(manifest_path)
    return discover(manifest_path, with_deps=with_deps)


def restore(store: str | None = None, key: str | None = None, restore_key: list[str] | None = None,
            manifest_path: str | None = None, allow_relocate: bool = False, as_json: bool = False,
            quiet: bool = False, scope: str | None = None, read_scope: list[str] | None = None) -> None:
    st = _restore(store, key, restore_key, manifest_path, allow_relocate, as_json, quiet, scope, read_scope)
    if st is not None and st.remote_store:
        _sync_cache(st, "down", quiet)


def _sync_cache(st, direction: str, quiet: bool) -> None:
    """The compile cache's local tier <-> the remote store's cache/ (rsnap.store.tiered)."""
    if os.environ.get("RSNAP_CACHE_SYNC", "1") in ("0", "false", "off", "no"):
        return
    from ..store import cache_sync
    try:
        (cache_sync.sync_cache_down if direction == "down" else cache_sync.sync_cache_up)(st)
    except StoreError as e:
        if not quiet:
            sys.stderr.write(f"rsnap: warning: compile cache not synced with {st.url}: {e}\n")


def _restore(store, key, restore_key, manifest_path, allow_relocate, as_json, quiet, scope, read_scope):
    started = time.monotonic()
    timings.mark("startup")
    ws = _discover(manifest_path)
    timings.mark("discover")
    k, inputs = key_and_inputs(ws, key)
    timings.mark("key")
    record_key = lambda: key_record.remember(ws, k, inputs, "explicit" if key else "default")  # noqa: E731
    prefixes = keys.fallback_prefixes(inputs, [keys.validate_key(p) for p in (restore_key or [])])
    base = {"key": k, "store": store or os.environ.get("RSNAP_STORE") or default_store_url(), "scope": scope or None}
    damaged_manifests: list[str] = []
    while True:
        try:
            st, name, kind, base["scope"] = find_in_scopes(store, scope, read_scope, k, prefixes, damaged_manifests)
        except StoreError as e:
            _miss(as_json, quiet, base, started, f"{e}; nothing restored (first run?)", ws, record_key)
            return None
        timings.mark("lookup")
        remote = st.remote_store  # a remote store that fails is a miss (exit 0), not an error
        if name is None:
            _miss(as_json, quiet, {**base, **_damaged_manifests(damaged_manifests)}, started,
                  f"no {'usable ' if damaged_manifests else ''}snapshot for key {k}; cargo will build from scratch"
                  "; set RUSTC_WRAPPER=rsnap-rustc to reuse single crates from the compile cache", ws, record_key)
            return st
        try:
            m = read_manifest(st, name, ws)
            break
        except (StoreError, FormatError) as e:
            if not _manifest_damage(e):
                if remote and isinstance(e, StoreError):
                    _miss(as_json, quiet, base, started, f"{e}; cargo will build from scratch", ws, record_key)
                    return None
                raise
            if not quiet:
                sys.stderr.write(f"rsnap: warning: snapshot {name} is damaged ({e}); trying the next one\n")
            damaged_manifests.append(name)
            if len(damaged_manifests) >= MAX_DAMAGED_MANIFESTS:
                _miss(as_json, quiet, {**base, **_damaged_manifests(damaged_manifests)}, started,
                      f"{e}; cargo will build from scratch", ws, record_key)
                return None
    timings.mark("manifest")
    if (m.workspace_root, m.cargo_home) != (str(ws.root), str(ws.cargo_home)) and not allow_relocate:
        _miss(as_json, quiet, base, started,
              f"snapshot {name} was taken at {m.workspace_root} with CARGO_HOME={m.cargo_home}, not here; "
              "treated as a miss (see --allow-relocate)", ws, record_key)
        return st
    with locked(ws.target_dir / RSNAP_DIR / "lock", f"target dir {ws.target_dir}"):
        was_interrupted = restore_interrupted(ws)
        try:
            settings = _settings(ws, m, inputs)
            out = restore_snapshot(ws, st, name, m, progress=None if not (as_json or quiet) else False,
                                   predict_with=lambda tree, changed: _predict(ws, m, inputs, changed, name, tree, settings))
            prediction = out.pop("prediction") or {"rebuild": None, "notes": ["no target dir in the snapshot"]}
            record_key()  # the next `rsnap save` in this target dir uses the key looked up here
        except StoreError as e:
            if not remote:
                raise
            from ..snapshot import fallback
            fallback.as_miss(ws)
            _miss(as_json, quiet, {**base, "snapshot": name}, started,
                  f"{e}; the partly restored target is not trusted (no fingerprints): cargo will build from scratch", ws, record_key)
            return None
    damage_warning = out.pop("damage_warning")
    if damage_warning and not quiet:
        sys.stderr.write(damage_warning + "\n")
    if damaged_manifests:
        out["damaged"] = {**(out["damaged"] or {}), **_damaged_manifests(damaged_manifests)["damaged"]}
    result = {**base, "result": kind, "snapshot": name, "snapshot_key": m.key, "fallback": _fallback(kind, m.key, inputs),
              "repaired_interrupted_restore": was_interrupted, **out, **prediction,
              "seconds": round(time.monotonic() - started, 3), "timings": _timings(),
              "discovery_cached": prefetch.from_cache(), "traffic": _traffic(st)}
    result["incremental_hint"] = _incremental_hint(inputs, m)
    prefetch.remember(ws.target_dir, manifest_path)
    if out["clock_shift_seconds"] and not as_json and not quiet:
        sys.stderr.write(f"rsnap: warning: the snapshot's mtimes lay up to {out['clock_shift_seconds']}s in this "
                         "machine's future (clock skew); all restored mtimes were moved back by that much\n")
    emit(as_json, result,
         f"rsnap: {kind} hit {m.key}{_FALLBACK_TEXT.get(result['fallback'], '')}: wrote {out['files_written']} files ({human_bytes(out['bytes_written'])}), "
         f"removed {out['files_removed']}, kept {out['files_unchanged']}, "
         f"{out['sources']['retimed'] + out['sources']['kept']} sources unchanged, "
         f"{out['sources']['bumped'] + out['sources']['newer']} changed, in {result['seconds']}s\n"
         + _left_out_line(out["skipped"])
         + f"rsnap: {prediction.get('summary', 'rebuild not predicted')}{_damage_note(out['damaged'])}"
         + "".join(f"\nrsnap: note: {n}" for n in prediction.get("notes", []))
         + (f"\nrsnap: hint: {result['incremental_hint']}" if result["incremental_hint"] else ""), quiet)
    return st


_FALLBACK_TEXT = {"other-job": " (another CI job's snapshot)"}


def _fallback(kind: str, snapshot_key: str, inputs: dict) -> str | None:
    """For a partial hit, whose snapshot it took: "job" (this CI job's), "other-job" (another job
    of the same workspace and toolchain), or "restore-key" (only a --restore-key matched)."""
    if kind != "partial":
        return None
    if snapshot_key.startswith(keys.job_prefix(inputs)):
        return "job"
    return "other-job" if snapshot_key.startswith(keys.family_prefix(inputs)) else "restore-key"


def _incremental_hint(inputs: dict, m) -> str | None:
    """What to set when cargo would silently build without the snapshot's incremental dirs."""
    from ..cargo import incremental_ci
    return incremental_ci.hint(os.environ, inputs["rustc"], list(inputs.get("cargo_config", {})),
                               lambda: incremental_ci.has_incremental_dirs(m))


MAX_DAMAGED_MANIFESTS = 8  # a store whose manifests all fail to read: a miss, not a LIST per snapshot


def _manifest_damage(e: RsnapError) -> bool:
    """A manifest that is gone, unreadable or fails validation is a miss for its snapshot only;
    one from a newer rsnap is not damage (exit 5), nor is a store that cannot be reached (a
    remote one: a miss; a local one: exit 3)."""
    return not isinstance(e, (NewerFormatError, TransientStoreError))


def _damaged_manifests(names: list[str]) -> dict:
    return {"damaged": {"manifests": list(names)}} if names else {}


def _damage_note(damaged: dict | None) -> str:
    n = (damaged or {}).get("units_left_out")
    return f" (besides the {n} units left out for store damage)" if n else ""


def _left_out_line(skipped: dict) -> str:
    if not skipped["units"] and not skipped["incremental_dirs"]:
        return ""
    return (f"rsnap: left out what this build will not read: {skipped['units']} units that will rebuild, "
            f"{skipped['incremental_dirs']} idle incremental dirs ({human_bytes(skipped['bytes'])})\n")


def find_in_scopes(store: str | None, scope: str | None, read_scope: list[str] | None, key: str,
                   prefixes: list[str], exclude=()):
    """(store, snapshot name, hit kind, scope): the exact key in each readable scope in order,
    then each prefix in each scope. Scopes whose namespace does not exist are skipped, and so
    are the snapshots named in `exclude` (damaged manifests)."""
    from ..store.scope import read_scopes
    opened, error = [], None
    for name in read_scopes(scope, read_scope):
        try:
            opened.append((open_store(store, create=False, scope=name or ""), name))
        except StoreError as e:
            error = error or e
    if not opened:
        raise error
    for st, name in opened:
        found = [n for n in repo.newest_snapshots(st, key, None, exact=True) if n not in exclude]
        if found:
            return st, found[0], "exact", name
    for prefix in prefixes:
        for st, name in opened:
            found = [n for n in repo.newest_snapshots(st, prefix, None) if n not in exclude]
            if found:
                return st, found[0], "partial", name
    return opened[0][0], None, "miss", opened[0][1]


def _traffic(st) -> dict | None:
    """Entries and bytes a store that counts them moved (gha://: the job summary's "moved" line)."""
    return dict(st.traffic) if st.traffic else None


def _timings() -> dict:
    """Seconds per phase of this call (rsnap.timings), then start over for the next call."""
    out = timings.report()
    timings.reset()
    return out


def _settings(ws, m, inputs):
    """The prediction's build settings, found before the restore holds cargo's locks (None: failed)."""
    from ..snapshot import predict
    try:
        return predict.settings_before_restore(ws, m, inputs)
    except Exception:  # noqa: BLE001 - the prediction then fails alone (see _predict)
        if os.environ.get("RSNAP_DEBUG"):
            raise
        return None


def _predict(ws, m, inputs, changed_sources, name, tree, settings) -> dict:
    """Which units cargo will rebuild and why (rsnap.snapshot.predict), with the units read
    (`_units`, for a partial restore); never fails a restore (no prediction: a full restore)."""
    from ..snapshot import predict
    try:
        if settings is None:
            raise RuntimeError("build settings could not be read before the restore")
        out = predict.after_restore(ws, m, inputs, changed_sources, name, tree, settings)
    except Exception as e:  # noqa: BLE001 - a prediction bug must not cost the job its cache
        if os.environ.get("RSNAP_DEBUG"):
            raise
        return {"rebuild": None, "notes": [f"rebuild prediction failed: {type(e).__name__}: {e}"]}
    return {k: out[k] for k in ("rebuild", "notes", "key_differences", "summary", "_units")}


def _miss(as_json, quiet, base, started, message, ws=None, record_key=None):
    if ws is not None:
        arm_usage(ws)
        if record_key is not None:
            record_key()
        from ..snapshot import predict
        predict.after_miss(ws)
    data = {**base, "result": "miss", "message": message, "files_written": 0, "bytes_written": 0,
            "seconds": round(time.monotonic() - started, 3), "timings": _timings()}
    emit(as_json, data, f"rsnap: miss: {message}", quiet)


def save(store: str | None = None, key: str | None = None, manifest_path: str | None = None,
         no_gc: bool = False, max_size: str | None = None, keep_cargo_home: bool = False,
         as_json: bool = False, quiet: bool = False, scope: str | None = None) -> None:
    from ..cargo import gc
    from ..snapshot.save import save as save_snapshot
    timings.mark("startup")
    ws = _discover(manifest_path, with_deps=True)
    timings.mark("discover")
    cap = max_size_bytes(ws, max_size)
    inputs = keys.key_inputs(ws)
    k, key_source = key_record.choose(ws, key and keys.validate_key(key), keys.default_key(inputs), inputs)
    st = open_store(store, scope=scope or "")
    timings.mark("key")
    with locked(ws.target_dir / RSNAP_DIR / "lock", f"target dir {ws.target_dir}"):
        if restore_interrupted(ws):
            raise RsnapError("the last restore into this target dir was interrupted; run `rsnap restore` "
                             "(or delete the target dir) before saving", EXIT_USAGE)
        gc_report = gc.before_save(ws, enabled=not no_gc, max_size=cap, cargo_home=not keep_cargo_home)
        # a CARGO_HOME left unpruned on disk is still pruned in the snapshot
        excluded = frozenset(gc.collect_cargo_home(ws, dry_run=True).get("unreferenced", [])) \
            if keep_cargo_home and not no_gc else frozenset()
        timings.mark("gc")
        out = save_snapshot(ws, st, k, inputs, keys.family_prefix(inputs),
                            progress=None if not (as_json or quiet) else False, home_excluded=excluded)
        key_record.consume(ws)
    prefetch.remember(ws.target_dir, manifest_path)
    if st.remote_store:
        _sync_cache(st, "up", quiet)
    if gc_report and not as_json and not quiet:
        sys.stderr.write(gc.format_report(gc_report) + "\n")
    emit(as_json, {**out, "store": st.url, "scope": scope or None, "gc": gc_report, "key_source": key_source,
                   "timings": _timings(), "traffic": _traffic(st),
                   "discovery_cached": prefetch.from_cache()},
         f"rsnap: saved {k} (key from {key_source}): {out['files']} files ({human_bytes(out['bytes_total'])}), "
         f"{out['blobs_new']} new blobs, wrote {human_bytes(out['bytes_written'])} in {out['seconds']}s", quiet)


def max_size_bytes(ws, option: str | None) -> int | None:
    """--max-size / RSNAP_MAX_SIZE, else [workspace.metadata.rsnap] max-size in Cargo.toml."""
    text = option
    if text is None:
        import tomllib
        try:
            with open(ws.root / "Cargo.toml", "rb") as f:
                doc = tomllib.load(f)
            text = doc.get("workspace", {}).get("metadata", {}).get("rsnap", {}).get("max-size")
        except (OSError, tomllib.TOMLDecodeError):
            text = None
    if text is None:
        return None
    from ..cargo import gc
    try:
        return gc.parse_size(str(text))
    except ValueError as e:
        raise RsnapError(str(e), EXIT_USAGE) from None
