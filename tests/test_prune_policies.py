"""`rsnap store prune` policies on a local store: --keep per key, --older-than, --max-size, grace."""
from __future__ import annotations

import os
import time

from rsnap import __version__
from rsnap.store import LocalStore
from rsnap.repository import manifest as mf, prune, repo


def snapshot(store, key: str, age_s: float, packs: dict[str, int]) -> str:
    """A manifest of `key` created `age_s` ago whose blobs live in the given packs (id -> bytes)."""
    blobs = {}
    for i, (pack_id, size) in enumerate(packs.items()):
        name = repo.pack_name(pack_id)
        if not store.exists(name):
            store.put(name, b"\0" * size)
            old = time.time() - 7200
            os.utime(store.root / name, (old, old))
        blobs[f"{i:032x}"] = [pack_id, 0, size, size]
    created = time.time_ns() - int(age_s * 1e9)
    m = mf.Manifest(key=key, created_ns=created, workspace_root="/ws", cargo_home="/ch", rsnap_version=__version__,
                    key_inputs={}, roots=[], sources=[], source_dirs=[], blobs=blobs, chunks={})
    name = repo.write_manifest(store, m)
    os.utime(store.root / name, (created / 1e9, created / 1e9))
    return name


def pid(n: int) -> str:
    return f"{n:032x}"


def test_keep_older_than_max_size_and_grace(tmp_path):
    st = LocalStore(tmp_path / "store")
    a_old = snapshot(st, "key-a", 10 * 86400, {pid(1): 1000, pid(2): 1000})
    a_new = snapshot(st, "key-a", 3600, {pid(2): 1000, pid(3): 1000})
    b_old = snapshot(st, "key-b", 20 * 86400, {pid(4): 5000})
    st.put(repo.pack_name(pid(9)), b"young orphan")            # inside the grace period
    dry = prune.prune(st, keep=2, older_than=7 * 86400, dry_run=True)
    assert {r["snapshot"] for r in dry["removed"]} == {a_old, b_old} and dry["dry_run"]
    assert len(st.list("snapshots/")) == 3                      # nothing deleted
    out = prune.prune(st, keep=2, older_than=7 * 86400)
    assert out["snapshots_deleted"] == 2 and out["packs_deleted"] == 2      # packs 1 and 4
    assert st.list("snapshots/") == [a_new]
    assert st.exists(repo.pack_name(pid(9))) and not st.exists(repo.pack_name(pid(4)))
    assert out["bytes_freed"] >= 6000
    # --max-size: the least recently used go until the rest fit; a touched manifest counts as used
    c = snapshot(st, "key-c", 7200, {pid(5): 3000})
    st.touch(c)                                                 # marked used just now
    out = prune.prune(st, keep=5, max_size=3500, grace_seconds=0)
    assert [r["snapshot"] for r in out["removed"]] == [a_new] and st.list("snapshots/") == [c]
    assert not st.exists(repo.pack_name(pid(2))) and not st.exists(repo.pack_name(pid(9)))


def test_parse_duration():
    assert prune.parse_duration("90s") == 90 and prune.parse_duration("2w") == 14 * 86400
    assert prune.parse_duration("1.5h") == 5400 and prune.parse_duration("60") == 60
