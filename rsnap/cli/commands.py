"""The bodies of `rsnap restore` and `rsnap save`, free of any CLI framework.

Both the typer CLI (rsnap/cli/app.py) and the fast argv path (rsnap/cli/entry.py) call these:
restore and save run in every CI job, so they must not pay typer's start-up.
"""
from __future__ import annotations

import json
import os
import sys
import time

from ..cargo import key_record, keys, prefetch
from ..cargo.layout import discover, RSNAP_DIR
from ..errors import RsnapError, StoreError, EXIT_USAGE
from ..progress import human_bytes
from ..snapshot.restore import restore as restore_snapshot
from ..snapshot.roots import arm_usage, locked, restore_interrupted
from ..store import default_store_url, open_store, repo


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
            quiet: bool = False) -> None:
    started = time.monotonic()
    ws = _discover(manifest_path)
    k, inputs = key_and_inputs(ws, key)
    record_key = lambda: key_record.remember(ws, k, inputs, "explicit" if key else "default")  # noqa: E731
    prefixes = [keys.validate_key(p) for p in (restore_key or [])] + [keys.family_prefix(inputs)]
    base = {"key": k, "store": store or os.environ.get("RSNAP_STORE") or default_store_url()}
    try:
        st = open_store(store, create=False)
    except StoreError as e:
        return _miss(as_json, quiet, base, started, f"{e}; nothing restored (first run?)", ws, record_key)
    name, kind = repo.find_snapshot(st, k, prefixes)
    if name is None:
        return _miss(as_json, quiet, base, started, f"no snapshot for key {k}; cargo will build from scratch"
                     "; set RUSTC_WRAPPER=rsnap-rustc to reuse single crates from the compile cache", ws, record_key)
    m = repo.read_manifest(st, name)
    if (m.workspace_root, m.cargo_home) != (str(ws.root), str(ws.cargo_home)) and not allow_relocate:
        return _miss(as_json, quiet, base, started,
                     f"snapshot {name} was taken at {m.workspace_root} with CARGO_HOME={m.cargo_home}, not here; "
                     "treated as a miss (see --allow-relocate)", ws, record_key)
    with locked(ws.target_dir / RSNAP_DIR / "lock", f"target dir {ws.target_dir}"):
        was_interrupted = restore_interrupted(ws)
        out = restore_snapshot(ws, st, name, m, progress=None if not (as_json or quiet) else False)
        prediction = _predict(ws, m, inputs, out.pop("changed_sources"), name)
        record_key()  # the next `rsnap save` in this target dir uses the key looked up here
    result = {**base, "result": kind, "snapshot": name, "snapshot_key": m.key,
              "repaired_interrupted_restore": was_interrupted, **out, **prediction,
              "seconds": round(time.monotonic() - started, 3)}
    emit(as_json, result,
         f"rsnap: {kind} hit {m.key}: wrote {out['files_written']} files ({human_bytes(out['bytes_written'])}), "
         f"removed {out['files_removed']}, kept {out['files_unchanged']}, "
         f"{out['sources']['retimed'] + out['sources']['kept']} sources unchanged, "
         f"{out['sources']['bumped'] + out['sources']['newer']} changed, in {result['seconds']}s\n"
         f"rsnap: {prediction.get('summary', 'rebuild not predicted')}"
         + "".join(f"\nrsnap: note: {n}" for n in prediction.get("notes", [])), quiet)


def _predict(ws, m, inputs, changed_sources, name) -> dict:
    """Which units cargo will rebuild and why (rsnap.snapshot.predict); never fails a restore."""
    from ..snapshot import predict
    try:
        out = predict.after_restore(ws, m, inputs, changed_sources, name)
    except Exception as e:  # noqa: BLE001 - a prediction bug must not cost the job its cache
        if os.environ.get("RSNAP_DEBUG"):
            raise
        return {"rebuild": None, "notes": [f"rebuild prediction failed: {type(e).__name__}: {e}"]}
    return {k: out[k] for k in ("rebuild", "notes", "key_differences", "summary")}


def _miss(as_json, quiet, base, started, message, ws=None, record_key=None):
    if ws is not None:
        arm_usage(ws)
        record_key()
        from ..snapshot import predict
        predict.after_miss(ws)
    data = {**base, "result": "miss", "message": message, "files_written": 0, "bytes_written": 0,
            "seconds": round(time.monotonic() - started, 3)}
    emit(as_json, data, f"rsnap: miss: {message}", quiet)


def save(store: str | None = None, key: str | None = None, manifest_path: str | None = None,
         no_gc: bool = False, max_size: str | None = None, keep_cargo_home: bool = False,
         as_json: bool = False, quiet: bool = False) -> None:
    from ..cargo import gc
    from ..snapshot.save import save as save_snapshot
    ws = _discover(manifest_path, with_deps=True)
    cap = max_size_bytes(ws, max_size)
    inputs = keys.key_inputs(ws)
    k, key_source = key_record.choose(ws, key and keys.validate_key(key), keys.default_key(inputs), inputs)
    st = open_store(store)
    with locked(ws.target_dir / RSNAP_DIR / "lock", f"target dir {ws.target_dir}"):
        if restore_interrupted(ws):
            raise RsnapError("the last restore into this target dir was interrupted; run `rsnap restore` "
                             "(or delete the target dir) before saving", EXIT_USAGE)
        gc_report = gc.before_save(ws, enabled=not no_gc, max_size=cap, cargo_home=not keep_cargo_home)
        # a CARGO_HOME left unpruned on disk is still pruned in the snapshot
        excluded = frozenset(gc.collect_cargo_home(ws, dry_run=True).get("unreferenced", [])) \
            if keep_cargo_home and not no_gc else frozenset()
        out = save_snapshot(ws, st, k, inputs, keys.family_prefix(inputs),
                            progress=None if not (as_json or quiet) else False, home_excluded=excluded)
        key_record.consume(ws)
    if gc_report and not as_json and not quiet:
        sys.stderr.write(gc.format_report(gc_report) + "\n")
    emit(as_json, {**out, "store": st.url, "gc": gc_report, "key_source": key_source},
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
