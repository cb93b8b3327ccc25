"""Issue 21 acceptance: rsnap with a gha:// store, the stand-in GitHub Actions cache service in
front of Azurite (tests/gha_server.py), which counts entries, uploads and blob bytes.

One workspace is built and saved once per module; tests restore it on a cold runner (fresh
clone, no target/, CARGO_HOME caches wiped) and check cargo's own verdicts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cargo_util import create_workspace
from gha_server import CacheServer
from rsnap_util import cold_runner, rsnap

pytest.importorskip("opendal", reason="the opendal wheel is not installed")
URL = "gha://ci"
KEY = "gha-shared-key"
PRISTINE = "gha-pristine"     # the module's unedited build: restores of it compile nothing


class Gha:
    def __init__(self, server: CacheServer, tmp):
        self.server = server
        self.env = {**server.env(), "XDG_CACHE_HOME": str(tmp / "xdg-cache")}

    def run(self, ws, *args, env=None):
        return rsnap(ws, URL, *args, env_extra={**self.env, **(env or {})})

    def delta(self):
        """Counters since the last call: twirp calls per method, blob requests and bytes."""
        now = self.server.counts.copy()
        got, self._last = now - getattr(self, "_last", now.__class__()), now
        return got

    def packs(self) -> list[str]:
        return [k for k in self.server.keys() if k.startswith("ci/packs/")]


@pytest.fixture(scope="module")
def gha(azurite, tmp_path_factory):
    server = CacheServer(azurite)
    saved_env = dict(os.environ)
    os.environ.update(server.env())      # in-process stores (complete()) see the same service
    yield Gha(server, tmp_path_factory.mktemp("gha"))
    os.environ.clear()
    os.environ.update(saved_env)
    server.stop()


@pytest.fixture(scope="module")
def saved(gha, registry, gitdep_url, tmp_path_factory):
    ws = create_workspace(tmp_path_factory.mktemp("ghasnap") / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    gha.delta()
    res = gha.run(ws, "save", "--json").check().data
    ws.first_save = gha.delta()
    assert res["files"] > 50 and res["packs_written"] >= 1
    assert ws.first_save["CreateCacheEntry"] == res["packs_written"] + 1 + res.get("cache_bundles", 0)
    ws.expected_output = ws.run_app()
    gha.run(ws, "save", "--key", PRISTINE, "--no-gc", "--json").check()
    return ws


def complete(names: list[str]) -> None:
    """Each named snapshot's packs are all in the store and every blob verifies."""
    from rsnap.repository import repo
    from rsnap.store import open_store
    store = open_store(URL, scope="")
    for name in names:
        m = repo.read_manifest(store, name)
        packs = {loc[0] for loc in m.blobs.values()}
        got = store.get_many([repo.pack_name(p) for p in packs])
        cache = {p: got[repo.pack_name(p)] for p in packs}
        for digest, loc in m.blobs.items():
            repo.read_blob(store, loc, digest, cache)


def test_round_trip_fresh_clone_compiles_nothing(gha, saved):
    ws = saved
    cold_runner(ws)
    gha.delta()
    res = gha.run(ws, "restore", "--key", PRISTINE, "--json").check().data
    got = gha.delta()
    assert res["result"] == "exact" and res["files_written"] > 50
    assert got["CreateCacheEntry"] == 0 and got["bytes_up"] == 0        # a restore writes nothing
    build = ws.build("build", "--offline")
    assert build.all_fresh(), build.summary()
    assert ws.run_app() == ws.expected_output


def _set_revision(ws, rev: int | str) -> None:
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", f"const APP_REVISION: u32 = {rev};")


def _edited_on_pristine(gha, ws, rev: int | str) -> None:
    """A cold runner restores the pristine snapshot, then the app is edited to `rev` and built."""
    cold_runner(ws)
    gha.run(ws, "restore", "--key", PRISTINE, "--json").check()
    _set_revision(ws, rev)
    ws.build("build", "--offline")


def test_second_save_after_a_one_line_change_uploads_only_new_packs(gha, saved):
    ws = saved
    _edited_on_pristine(gha, ws, 3)
    packs_before, entries_before = set(gha.packs()), len(gha.server.entries())
    gha.delta()
    res = gha.run(ws, "save", "--key", "gha-edit", "--json").check().data
    got = gha.delta()
    new_packs = set(gha.packs()) - packs_before
    # only the new packs and the manifest became entries; every upload was one of them
    assert len(new_packs) == res["packs_written"] >= 1
    assert len(gha.server.entries()) - entries_before == got["FinalizeCacheEntryUpload"] == len(new_packs) + 1
    assert got["CreateCacheEntry"] == got["FinalizeCacheEntryUpload"]
    assert got["bytes_up"] <= 0.20 * saved.first_save["bytes_up"], (got["bytes_up"], saved.first_save["bytes_up"])
    # restoring that newest snapshot on a cold runner with the same edit compiles nothing
    cold_runner(ws)
    _set_revision(ws, 3)
    assert gha.run(ws, "restore", "--key", "gha-edit", "--json").check().data["result"] == "exact"
    assert ws.build("build", "--offline").all_fresh()
    assert "rev=3" in ws.run_app()


def test_concurrent_saves_of_one_key_leave_complete_snapshots(gha, saved, tmp_path):
    ws = saved
    cold_runner(ws)
    gha.run(ws, "restore", "--key", PRISTINE, "--json").check()
    other = tmp_path / "copy"
    shutil.copytree(ws.root, other, symlinks=True)
    env = {**os.environ, **ws.env, **gha.env, "RSNAP_STORE": URL}
    env.pop("CI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "rsnap", "save", "--key", KEY, "--json", "--no-gc",
                               "--manifest-path", str(root / "Cargo.toml")],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for root in (ws.root, other)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    names = [k[len("ci/"):] for k in gha.server.keys() if k.startswith(f"ci/snapshots/{KEY}/")]
    assert len(names) == 2
    complete(names)
    cold_runner(ws)
    res = gha.run(ws, "restore", "--key", KEY, "--allow-relocate", "--json").check().data
    assert res["result"] == "exact", res
    assert ws.build("build", "--offline").all_fresh()


def test_throttled_save_waits_out_retry_after(gha, saved):
    ws = saved
    _edited_on_pristine(gha, ws, 4)
    gha.server.throttle(4, retry_after=1, methods={"CreateCacheEntry"})
    gha.delta()
    res = gha.run(ws, "save", "--key", "gha-throttled", "--json")
    got = gha.delta()
    assert res.returncode == 0 and got["throttled"] == 4, (res.stderr, got)
    assert any(k.startswith("ci/snapshots/gha-throttled/") for k in gha.server.keys())


def _edit_snapshot_packs(gha, ws, rev: str) -> tuple[str, set[str]]:
    """Save the app edited to `rev` on top of the pristine snapshot: (key, the packs only it has)."""
    _edited_on_pristine(gha, ws, rev)
    before = set(gha.packs())
    key = f"gha-damage-{rev}"
    gha.run(ws, "save", "--key", key, "--json").check()
    return key, set(gha.packs()) - before


@pytest.mark.parametrize("damage", ["evicted", "corrupt"])
def test_damaged_packs_rebuild_only_their_units(gha, saved, damage):
    """GitHub evicts entries (7 days unused, or over budget): a missing or corrupt pack costs only
    the units whose files it holds (here the edited app) and their dependents, and never a stale build."""
    ws = saved
    rev = "5" if damage == "evicted" else "6"
    key, own = _edit_snapshot_packs(gha, ws, rev)
    assert own
    if damage == "evicted":
        assert gha.server.delete(lambda k: k in own)
    else:
        assert gha.server.corrupt(lambda k: k in own)
    cold_runner(ws)
    _set_revision(ws, rev)
    res = gha.run(ws, "restore", "--key", key, "--json")
    assert res.returncode == 0, res.stderr
    build = ws.build("build", "--offline")
    assert build.compiled() == {"app"}, build.summary()
    assert f"rev={rev}" in ws.run_app()
