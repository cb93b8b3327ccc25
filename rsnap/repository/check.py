"""`rsnap store check`: which snapshots a damaged store can no longer restore whole (restic's check).

A snapshot is damaged when its manifest is unreadable, or a blob it references lies in a pack
that is missing, shorter than the blob's location says, or (with `read_data`) whose bytes do
not decompress to the blob's size and xxh3: the verification a restore does (repo.write_blob).
Without `read_data` the check costs one LIST of the packs and one GET per manifest.

`repair` drops the damaged snapshots (their manifests) under the exclusive store lock, as prune
does, and deletes the damaged packs that no remaining snapshot references. It never deletes a
pack another snapshot uses: a pack whose other blobs verify stays for the snapshots that use
only those. The next save writes the lost content again.
"""
from __future__ import annotations

import os

from ..errors import FormatError, NotFoundError, PermanentStoreError, StoreError
from . import manifest as mf, repo


def check(store, read_data: bool = False, repair: bool = False) -> dict:
    if not store.capabilities.list:
        raise PermanentStoreError(f"store {store.url} cannot list its snapshots, which `rsnap store check` needs")
    if repair and not store.capabilities.delete:
        raise PermanentStoreError(f"store {store.url} cannot delete objects: `--repair` cannot drop snapshots there")
    if not repair:
        report, _tables = _check(store, read_data)
        return {**report, "repaired": False, "snapshots_dropped": [], "packs_deleted": []}
    with store.lock(exclusive=True) as held:    # no save is between writing its packs and its manifest
        report, tables = _check(store, read_data)
        held.check()
        return {**report, **_repair(store, report, tables)}


def _check(store, read_data: bool) -> tuple[dict, dict[str, dict]]:
    """The report, and name -> blob table of each readable manifest."""
    names = [name for name, _key, _created in repo.list_snapshots(store)]
    tables, damaged, newer = _read_tables(store, names)
    pack_sizes = {n.rsplit("/", 1)[-1]: size for n, size, _m in _authority(store).stat_all("packs/")}
    bad_packs: dict[str, str] = {}       # pack id -> its problem
    bad_blobs: set[tuple] = set()        # (digest, pack, offset, clen, size) a restore cannot have
    for blobs in tables.values():
        for digest, (pack, off, clen, size) in blobs.items():
            if pack not in pack_sizes:
                bad_packs[pack] = "missing"
            elif off + clen > pack_sizes[pack]:
                bad_packs[pack] = f"truncated ({pack_sizes[pack]} bytes, a blob ends at {off + clen})"
            else:
                continue
            bad_blobs.add((digest, pack, off, clen, size))
    bytes_read = 0
    if read_data:
        corrupt, bytes_read = _read_data(store, tables, set(bad_packs))
        for blob, problem in corrupt.items():
            bad_packs.setdefault(blob[1], problem)
            bad_blobs.add(blob)
    for name, blobs in tables.items():
        hit = sorted({loc[0] for digest, loc in blobs.items() if (digest, *loc) in bad_blobs})
        if hit:
            damaged[name] = [f"pack {p} {bad_packs[p].split(' (')[0]}" for p in hit]
    referenced = {loc[0] for blobs in tables.values() for loc in blobs.values()}
    report = {"store": store.url, "read_data": read_data, "snapshots_checked": len(names),
              "snapshots_newer_format": newer, "packs_checked": len(referenced & set(pack_sizes)),
              "bytes_read": bytes_read, "packs_unreferenced": len(set(pack_sizes) - referenced),
              "packs_damaged": [{"pack": repo.pack_name(p), "problem": why} for p, why in sorted(bad_packs.items())],
              "snapshots_damaged": [{"snapshot": n, "problems": damaged[n]} for n in names if n in damaged]}
    return report, tables


def _authority(store):
    """A tiered store's remote store: what every runner reads, and where a pack is present or not."""
    from ..store.tiered import TieredStore
    return store.remote if isinstance(store, TieredStore) else store


def _read_tables(store, names: list[str]):
    """(name -> blob table of each readable manifest, name -> problems of the damaged ones,
    names of manifests from a newer rsnap: not damage, never dropped). A manifest that vanished
    meanwhile (a prune) is left out; a store error ends the check."""
    source = _authority(store)

    def read(name):
        try:
            data = source.get(name)
        except NotFoundError:
            return None
        try:
            return mf.loads_blob_tables(data)[0]
        except FormatError as e:
            return "newer" if _newer_format(data) else f"manifest unreadable: {e}"
    tables, damaged, newer = {}, {}, []
    for name, got in zip(names, source.map_parallel(read, names)):
        if isinstance(got, dict):
            tables[name] = got
        elif got == "newer":
            newer.append(name)
        elif got:
            damaged[name] = [got]
    return tables, damaged, newer


def _newer_format(data: bytes) -> bool:
    import json
    import zstandard
    try:
        fmt = json.loads(zstandard.ZstdDecompressor().decompress(data, max_output_size=mf.MAX_MANIFEST_BYTES))["format"]
        return isinstance(fmt, int) and fmt > mf.FORMAT_VERSION
    except Exception:  # noqa: BLE001 - anything unparsable is damage, not a newer format
        return False


def _read_data(store, tables: dict[str, dict], skip: set[str]) -> tuple[dict[tuple, str], int]:
    """Fetch every referenced pack (but those in `skip`) and verify each of its blobs as a
    restore does. Returns {blob: problem} for the blobs that fail, and the bytes read."""
    by_pack: dict[str, set[tuple]] = {}
    for blobs in tables.values():
        for digest, loc in blobs.items():
            if loc[0] not in skip:
                by_pack.setdefault(loc[0], set()).add((digest, *loc))
    source = _authority(store)
    null = os.open(os.devnull, os.O_WRONLY)

    def verify(pack: str) -> tuple[dict[tuple, str], int]:
        try:
            data = memoryview(source.get(repo.pack_name(pack)))
        except NotFoundError:       # deleted since the LIST
            return {blob: "missing" for blob in by_pack[pack]}, 0
        bad = {}
        for blob in by_pack[pack]:
            digest, _pack, off, clen, size = blob
            try:
                repo.write_blob(data[off:off + clen], null, digest, size, f"pack {pack}")
            except StoreError:
                bad[blob] = f"corrupt (blob {digest} fails verification)"
        return bad, len(data)
    try:
        results = source.map_parallel(verify, sorted(by_pack))
    finally:
        os.close(null)
    corrupt = {blob: why for bad, _n in results for blob, why in bad.items()}
    return corrupt, sum(n for _bad, n in results)


def _repair(store, report: dict, tables: dict[str, dict]) -> dict:
    """Delete the damaged snapshots, then the damaged packs no remaining snapshot references
    (none while a newer rsnap's snapshot, whose references are unknown here, is in the store)."""
    dropped = [s["snapshot"] for s in report["snapshots_damaged"]]
    kept = {loc[0] for name, blobs in tables.items() if name not in dropped for loc in blobs.values()}
    doomed = [] if report["snapshots_newer_format"] else \
        [p["pack"] for p in report["packs_damaged"] if p["problem"] != "missing" and p["pack"].rsplit("/", 1)[-1] not in kept]
    store.delete_many(dropped)      # manifests first: a snapshot never names a deleted pack
    store.delete_many(doomed)
    return {"repaired": True, "snapshots_dropped": dropped, "packs_deleted": doomed}


def format_report(out: dict) -> str:
    lines = []
    for s in out["snapshots_damaged"]:
        verb = "dropped" if s["snapshot"] in out["snapshots_dropped"] else "damaged"
        lines.append(f"rsnap: {verb} {s['snapshot']}: {'; '.join(s['problems'][:3])}"
                     + (f" (+{len(s['problems']) - 3} more)" if len(s["problems"]) > 3 else ""))
    for p in out["packs_deleted"]:
        lines.append(f"rsnap: deleted damaged pack {p}")
    from ..progress import human_bytes
    how = f", {human_bytes(out['bytes_read'])} read and verified" if out["read_data"] else \
        " (present and long enough; --read-data verifies their bytes)"
    found = len(out["snapshots_damaged"])
    lines.append(f"rsnap: checked {_n(out['snapshots_checked'], 'snapshot')}, {_n(out['packs_checked'], 'pack')}{how}: "
                 + ("no damage" if not found else
                    f"{_n(found, 'damaged snapshot')}"
                    + (" dropped" if out["repaired"] else " (rsnap store check --repair drops them)")))
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"
