"""Command-line interface (typer). Every command: --help, --json, documented exit codes."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

import typer

from .. import __version__
from ..cargo import keys
from ..cargo.layout import discover
from ..errors import FormatError, StoreError
from ..progress import human_bytes
from ..snapshot.roots import restore_interrupted
from ..store import open_store
from ..repository import repo
from . import commands

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Incremental Rust CI builds: snapshot target/ and CARGO_HOME, restore them with mtime normalization.\n\n"
                       "Typical CI use:  rsnap restore && cargo build && rsnap save")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and prune the snapshot store.")
app.add_typer(store_app, name="store")

StoreOpt = typer.Option(None, "--store", envvar="RSNAP_STORE",
                        help="Store path, file:// or s3://bucket/prefix URL (AWS_* environment; RSNAP_LOCAL_STORE adds a "
                             "local tier). Default: $XDG_CACHE_HOME/rsnap or ~/.cache/rsnap.")
KeyOpt = typer.Option(None, "--key", envvar="RSNAP_KEY", help="Snapshot key. Default: derived (see `rsnap key`).")
ScopeOpt = typer.Option(None, "--scope", envvar="RSNAP_SCOPE",
                        help="Namespace this run writes (and reads first), e.g. the branch; untrusted runs get their own. "
                             "Default: the store's top level.")
ReadScopeOpt = typer.Option(None, "--read-scope",
                            help="Scope to fall back to when the own scope has no match, e.g. the default branch "
                                 "(repeatable, tried in order; '-' is the top level; env RSNAP_READ_SCOPES, comma-separated).")
RestoreKeyOpt = typer.Option(None, "--restore-key", help="Key prefix to fall back to on an exact miss (repeatable, tried in order).")
ManifestOpt = typer.Option(None, "--manifest-path", help="Path to Cargo.toml (default: cargo's discovery from the cwd).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of text.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr.")


@app.command()
def restore(
    store: Optional[str] = StoreOpt, key: Optional[str] = KeyOpt,
    restore_key: Optional[List[str]] = RestoreKeyOpt, manifest_path: Optional[str] = ManifestOpt,
    allow_relocate: bool = typer.Option(
        False, "--allow-relocate",
        help="Restore a snapshot taken at another workspace path or CARGO_HOME. RISK: cargo will rebuild "
             "most crates anyway, and crates that embed env!(\"CARGO_MANIFEST_DIR\") or OUT_DIR may keep "
             "the old path and be stale. Off by default: such snapshots count as a miss."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, scope: Optional[str] = ScopeOpt,
    read_scope: Optional[List[str]] = ReadScopeOpt,
):
    """Restore the newest matching snapshot into the target dir and CARGO_HOME.

    A miss exits 0 so `rsnap restore && cargo build && rsnap save` works on the first run.
    """
    commands.restore(store, key, restore_key, manifest_path, allow_relocate, as_json, quiet, scope, read_scope)


NoGcOpt = typer.Option(False, "--no-gc", help="Skip garbage collection before saving.")
MaxSizeOpt = typer.Option(None, "--max-size", envvar="RSNAP_MAX_SIZE",
                          help="Size cap for target + build dirs (e.g. 2G); least recently used units go first. "
                               "Also [workspace.metadata.rsnap] max-size in Cargo.toml.")
KeepHomeOpt = typer.Option(False, "--keep-cargo-home", envvar="RSNAP_KEEP_CARGO_HOME",
                           help="Do not delete unreferenced downloads from $CARGO_HOME on disk (a CARGO_HOME shared "
                                "by several projects, e.g. ~/.cargo on a persistent runner or a laptop); the "
                                "snapshot still leaves them out.")


@app.command()
def save(
    store: Optional[str] = StoreOpt, key: Optional[str] = KeyOpt,
    manifest_path: Optional[str] = ManifestOpt, no_gc: bool = NoGcOpt, max_size: Optional[str] = MaxSizeOpt,
    keep_cargo_home: bool = KeepHomeOpt, as_json: bool = JsonOpt, quiet: bool = QuietOpt,
    scope: Optional[str] = ScopeOpt,
):
    """Garbage-collect, then save the target dir and CARGO_HOME caches; only new content is written.

    The snapshot goes into --scope's namespace only (see `rsnap restore --help`)."""
    commands.save(store, key, manifest_path, no_gc, max_size, keep_cargo_home, as_json, quiet, scope)


@app.command("gc")
def gc_command(
    manifest_path: Optional[str] = ManifestOpt, max_size: Optional[str] = MaxSizeOpt,
    keep_cargo_home: bool = KeepHomeOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be removed; remove nothing."),
    as_json: bool = JsonOpt,
):
    """Remove stale units, old incremental sessions and unreferenced CARGO_HOME downloads."""
    from ..cargo import gc
    ws = discover(manifest_path)
    report = gc.collect(ws, dry_run=dry_run, max_size=commands.max_size_bytes(ws, max_size), cargo_home=not keep_cargo_home)
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(gc.format_report(report))


@app.command("cargo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def cargo_command(ctx: typer.Context):
    """Run cargo and record which units it used (exact liveness for `rsnap gc`), e.g. `rsnap cargo build`."""
    args = list(ctx.args)
    manifest = next((a.split("=", 1)[1] for a in args if a.startswith("--manifest-path=")), None)
    if manifest is None and "--manifest-path" in args[:-1]:
        manifest = args[args.index("--manifest-path") + 1]
    from ..cargo import usage_log
    raise typer.Exit(usage_log.run_cargo(args, discover(manifest)))


@app.command()
def stats(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
          zero: bool = typer.Option(False, "--zero", help="Reset the counters after showing them.")):
    """Compile-cache statistics of the rsnap-rustc wrapper: requests, hits, misses, reasons, bytes, time saved."""
    from ..compile_cache import stats as wrapper_stats
    data = wrapper_stats.show_stats(store, as_json=as_json, zero=zero)
    if as_json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(wrapper_stats.format_stats(data))


@app.command()
def key(manifest_path: Optional[str] = ManifestOpt, as_json: bool = JsonOpt):
    """Print the default snapshot key and the inputs it was derived from."""
    ws = discover(manifest_path)
    inputs = keys.key_inputs(ws)
    k = keys.default_key(inputs)
    if as_json:
        print(json.dumps({"key": k, "restore_prefix": keys.family_prefix(inputs),
                          "restore_prefixes": keys.fallback_prefixes(inputs), "inputs": inputs}, sort_keys=True))
    else:
        print(k)
        print(f"# fallback prefixes: {' then '.join(keys.fallback_prefixes(inputs))}")
        for name, value in inputs.items():
            if isinstance(value, str) and "\n" in value:
                value = value.strip().splitlines()[0] + " ..."
            print(f"# {name}: {value}")


@app.command()
def status(
    store: Optional[str] = StoreOpt, key: Optional[str] = KeyOpt,
    restore_key: Optional[List[str]] = RestoreKeyOpt, manifest_path: Optional[str] = ManifestOpt,
    as_json: bool = JsonOpt, scope: Optional[str] = ScopeOpt, read_scope: Optional[List[str]] = ReadScopeOpt,
):
    """Show what a restore would do (including which crates cargo would then rebuild, and why) and
    what the target dir holds. Reads only; writes nothing."""
    ws = discover(manifest_path)
    k, inputs = commands.key_and_inputs(ws, key)
    prefixes = keys.fallback_prefixes(inputs, [keys.validate_key(p) for p in (restore_key or [])])
    data = {"key": k, "workspace_root": str(ws.root), "target_dir": str(ws.target_dir),
            "build_dir": str(ws.build_dir), "cargo_home": str(ws.cargo_home),
            "interrupted_restore": restore_interrupted(ws)}
    for name, top in (("target", ws.target_dir), ("build", ws.build_dir)):
        if name == "build" and top == ws.target_dir:
            continue  # the build dir is the target dir
        files, size = 0, 0
        for dirpath, dirs, fns in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in (str(ws.target_dir), str(ws.build_dir))]
            for fn in fns:
                try:
                    size += os.lstat(os.path.join(dirpath, fn)).st_size
                    files += 1
                except OSError:
                    pass
        data[f"{name}_files"], data[f"{name}_bytes"] = files, size
    try:
        st, name, kind, found_scope = commands.find_in_scopes(store, scope, read_scope, k, prefixes)
    except StoreError as e:
        name, kind, found_scope, data["store_error"] = None, "miss", None, str(e)
    damaged, m = [], None
    while name and len(damaged) < commands.MAX_DAMAGED_MANIFESTS:
        try:
            m = repo.read_manifest(st, name)
            break
        except (StoreError, FormatError) as e:  # a damaged manifest: restore would take the next one
            if not commands._manifest_damage(e):
                raise
            damaged.append(name)
            st, name, kind, found_scope = commands.find_in_scopes(store, scope, read_scope, k, prefixes, damaged)
    data["would_restore"] = {"result": kind if m else "miss", "snapshot": name if m else None, "scope": found_scope,
                             "damaged_manifests": damaged}
    if m:
        data["would_restore"].update(files=m.file_count(), bytes=m.total_size(),
                                     relocated=(m.workspace_root, m.cargo_home) != (str(ws.root), str(ws.cargo_home)))
        from . import explain as explain_cli
        data.update(explain_cli.status_rebuild(ws, st, m, inputs))
    if as_json:
        print(json.dumps(data, sort_keys=True))
    else:
        for k2, v in data.items():
            print(f"{k2}: {v}")


@app.command()
def explain(manifest_path: Optional[str] = ManifestOpt, as_json: bool = JsonOpt):
    """After `rsnap restore` and a cargo build: which units cargo rebuilt and why, and where the
    restore's prediction was wrong. Exit 4 if no restore was recorded in the target dir."""
    from . import explain as explain_cli
    explain_cli.explain(manifest_path, as_json)


@store_app.command("ls")
def store_ls(store: Optional[str] = StoreOpt, prefix: str = typer.Option("", "--prefix", help="Only keys starting with this."),
             as_json: bool = JsonOpt, scope: Optional[str] = ScopeOpt):
    """List snapshots in the store (in --scope's namespace), newest first."""
    st = open_store(store, create=False, scope=scope or "")
    rows = []
    for name, k, created in repo.list_snapshots(st, prefix):
        rows.append({"snapshot": name, "key": k, "created": _iso(created), "manifest_bytes": st.size(name)})
    if as_json:
        print(json.dumps({"store": st.url, "snapshots": rows}, sort_keys=True))
    else:
        for r in rows:
            print(f"{r['created']}  {r['key']}  {r['snapshot']}")
        if not rows:
            print("(no snapshots)", file=sys.stderr)


@store_app.command("prune")
def store_prune(store: Optional[str] = StoreOpt,
                keep: int = typer.Option(1, "--keep", min=1, help="Snapshots to keep per key (most recently used)."),
                older_than: Optional[str] = typer.Option(
                    None, "--older-than", help="Also delete snapshots not used for this long (e.g. 12h, 7d, 2w). "
                                               "Use = when the snapshot was saved."),
                max_size: Optional[str] = typer.Option(
                    None, "--max-size", help="Also delete the least recently used snapshots until the rest "
                                             "(their packs and manifests) fit in this size (e.g. 20G)."),
                grace: Optional[str] = typer.Option(
                    None, "--grace", envvar="RSNAP_PRUNE_GRACE",
                    help="Never delete packs younger than this (saves in progress upload packs before their "
                         "manifest). Default 1h."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be deleted."),
                as_json: bool = JsonOpt, scope: Optional[str] = ScopeOpt):
    """Delete old snapshots (--keep per key, --older-than, --max-size) and packs no snapshot references (in --scope's namespace)."""
    from ..cargo.gc import parse_size
    from ..errors import RsnapError, EXIT_USAGE
    from ..repository import prune
    try:
        age = prune.parse_duration(older_than) if older_than else None
        grace_s = prune.parse_duration(grace) if grace else None
        cap = parse_size(max_size) if max_size else None
    except ValueError as e:
        raise RsnapError(str(e), EXIT_USAGE) from None
    st = open_store(store, create=False, scope=scope or "")
    out = prune.prune(st, keep=keep, dry_run=dry_run, older_than=age, max_size=cap, grace_seconds=grace_s)
    lines = [f"rsnap: {'would delete' if dry_run else 'deleted'} {r['snapshot']} ({r['reason']})" for r in out["removed"]]
    lines.append(f"rsnap: pruned {out['snapshots_deleted']} snapshots, {out['packs_deleted']} packs "
                 f"({human_bytes(out['bytes_freed'])} freed); kept {out['snapshots_kept']} snapshots "
                 f"({human_bytes(out['bytes_kept'])}){' (dry run)' if dry_run else ''}")
    commands.emit(as_json, out, "\n".join(lines))


@store_app.command("check")
def store_check(store: Optional[str] = StoreOpt,
                read_data: bool = typer.Option(
                    False, "--read-data", help="Also read every referenced pack and verify each blob's size and "
                                               "xxh3, as a restore does (reads the whole store)."),
                repair: bool = typer.Option(
                    False, "--repair", help="Drop the damaged snapshots (and damaged packs no other snapshot "
                                            "uses), under the exclusive store lock; the next save writes the content again."),
                as_json: bool = JsonOpt, scope: Optional[str] = ScopeOpt):
    """Find snapshots that reference missing, truncated or (--read-data) corrupt packs, or whose
    manifest is unreadable (in --scope's namespace).

    Exit codes: 0 no damage (or --repair dropped all of it), 3 damage found (or the store could
    not be read), 2 bad usage."""
    from ..errors import EXIT_STORE
    from ..repository import check
    st = open_store(store, create=False, scope=scope or "")
    out = check.check(st, read_data=read_data, repair=repair)
    commands.emit(as_json, out, check.format_report(out))
    if out["snapshots_damaged"] and not out["repaired"]:
        raise typer.Exit(EXIT_STORE)


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        print(f"rsnap {__version__}")
        raise typer.Exit(0)
