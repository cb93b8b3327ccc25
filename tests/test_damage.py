"""Issue 20: damage costs only what it touches, on every store.

One workspace is built and saved once per module into a local store; each test copies that
store (to a directory, or object by object into a moto bucket), deletes or corrupts a pack,
restores on a cold runner (fresh clone, no target/, CARGO_HOME caches wiped) and checks cargo's
own verdicts (--message-format=json "fresh"): the restore exits 0 naming the damage, cargo
compiles fewer units than a clean build, the program is right, and the next save stores the
lost content again, so a restore after it is whole and compiles nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cargo_util import create_workspace
from rsnap_util import rsnap, cold_runner

KEY = "damage-key"
PACK_SIZE = 1 << 20


def build_and_save(ws):
    """(store, units a clean `cargo build` compiles)."""
    clean = ws.build("build")
    store = ws.root.parent / "store"
    # small packs (the fixture's target fits one 16 MiB pack), filled in a fixed order: on one CPU
    # save runs one worker, which hashes and compresses files biggest first, so the same files
    # share a pack on every run
    env = {**ws.env, "RSNAP_STORE": str(store), "RSNAP_PACK_SIZE": str(PACK_SIZE)}
    subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-m", "rsnap", "save",
                    "--key", KEY], cwd=ws.root, env=env, check=True, capture_output=True)
    ws.expected_output = ws.run_app()
    return store, len(clean.compiled_units())


@pytest.fixture(scope="module")
def saved(registry, gitdep_url, tmp_path_factory):
    """(workspace, store, units a clean `cargo build` compiles)."""
    ws = create_workspace(tmp_path_factory.mktemp("damage") / "ws", registry.index_url, gitdep_url)
    return (ws, *build_and_save(ws))


def packs(store: Path) -> list[Path]:
    """Pack files, largest first."""
    return sorted((p for p in (store / "packs").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)


def damage_bytes(data: bytes, how: str) -> bytes | None:
    """None: the pack is deleted."""
    if how == "missing":
        return None
    if how == "truncated":
        return data[: len(data) // 16]
    out = bytearray(data)  # "corrupt": a flipped byte in every 4 KiB (most blobs' checks fail)
    for i in range(len(out) // 2 % 4096, len(out), 4096):
        out[i] ^= 0x55
    return bytes(out)


class LocalStore:
    def __init__(self, source: Path, dest: Path):
        shutil.copytree(source, dest)
        self.path, self.url, self.env = dest, str(dest), {}

    def damage(self, name: str, how: str) -> None:
        data = damage_bytes((self.path / name).read_bytes(), how)
        if data is None:
            (self.path / name).unlink()
        else:
            (self.path / name).write_bytes(data)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()


class BucketStore:
    """The same objects in a moto bucket (optionally with a local tier in front)."""

    def __init__(self, source: Path, moto, bucket: str, tier: Path | None):
        import os
        from rsnap.store.s3 import S3Store
        moto.create_bucket(bucket)
        self.url = f"s3://{bucket}/ci"
        self.env = {k: v for k, v in moto.env().items() if k.startswith("AWS_")}
        self.env.update(RSNAP_S3_RETRIES="1", RSNAP_S3_RETRY_MIN_DELAY="0.01", RSNAP_CACHE_SYNC="0")
        if tier is not None:
            self.env["RSNAP_LOCAL_STORE"] = str(tier)
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            self.s3 = S3Store(self.url)
            for p in source.rglob("*"):
                rel = p.relative_to(source).as_posix()
                if p.is_file() and rel.split("/")[0] in ("packs", "snapshots"):
                    self.s3.put(rel, p.read_bytes())
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def _with_env(self, fn):
        import os
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            return fn()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def damage(self, name: str, how: str) -> None:
        data = damage_bytes(self._with_env(lambda: bytes(self.s3.get(name))), how)
        self._with_env(lambda: self.s3.delete(name) if data is None else self.s3.put(name, data))

    def has(self, name: str) -> bool:
        return self._with_env(lambda: self.s3.exists(name))


@pytest.fixture
def make_store(saved, tmp_path, request):
    ws, source, _clean = saved

    def make(kind: str):
        if kind == "local":
            return LocalStore(source, tmp_path / "store")
        moto = request.getfixturevalue("moto_server")
        bucket = f"damage-{abs(hash(request.node.nodeid)) % 10**8}"
        return BucketStore(source, moto, bucket, tmp_path / "tier" if kind == "tiered" else None)
    return make


def restore(ws, store, *args):
    res = rsnap(ws, store.url, "restore", "--key", KEY, "--json", *args, env_extra=store.env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res, json.loads(res.stdout)


@pytest.mark.parametrize("kind,how", [("local", "missing"), ("local", "corrupt"), ("s3", "missing"),
                                      ("s3", "truncated"), ("tiered", "corrupt")])
def test_damaged_pack_costs_only_its_units(saved, make_store, kind, how):
    ws, source, clean_units = saved
    store = make_store(kind)
    largest = packs(source)[0]
    name = largest.relative_to(source).as_posix()
    store.damage(name, how)
    cold_runner(ws)
    res, data = restore(ws, store)
    assert data["result"] == "exact", data
    damaged = data["damaged"]
    assert damaged["packs"] == [largest.name], damaged
    assert damaged["missing" if how == "missing" else "corrupt"] == 1, damaged
    assert damaged["units_left_out"] >= 1, damaged
    warnings = [line for line in res.stderr.splitlines() if line.startswith("rsnap: warning:")]
    assert len(warnings) == 1 and "1 damaged pack" in warnings[0], res.stderr
    build = ws.build("build")
    rebuilt = build.compiled_units()
    assert 0 < len(rebuilt) < clean_units, (len(rebuilt), clean_units, build.summary())
    assert len(rebuilt) <= damaged["units_left_out"], (damaged, build.summary())
    assert ws.run_app() == ws.expected_output
    # the next save stores what the damaged pack held again; a restore of it is whole
    save = rsnap(ws, store.url, "save", "--key", KEY, "--json", env_extra=store.env).check().data
    assert save["bytes_written"] > 0, save
    cold_runner(ws)
    _res, data = restore(ws, store)
    assert data["damaged"] is None, data
    again = ws.build("build", "--offline")
    assert again.all_fresh(), again.summary()
    assert ws.run_app() == ws.expected_output


@pytest.mark.parametrize("how", ["missing", "garbage"])
def test_damaged_manifest_falls_back_to_the_next_snapshot(saved, tmp_path, how):
    ws, source, _clean = saved
    store = LocalStore(source, tmp_path / "store")
    older = sorted((store.path / "snapshots" / KEY).iterdir())[-1]
    newer = older.with_name(f"{int(older.name.split('-')[0]) + 1}-{older.name.split('-')[1]}")
    newer.write_bytes(b"\x28\xb5\x2f\xfd garbage" if how == "garbage" else b"")
    if how == "missing":  # named, then gone (a prune racing the restore), seen through a dangling link
        newer.unlink()
        newer.symlink_to(tmp_path / "nowhere")
    # snapshot order comes from the store's own times (stat_snapshots), so a name whose object is
    # gone by then is no candidate at all; one that is there but unreadable is damage
    damaged = [f"snapshots/{KEY}/{newer.name}"] if how == "garbage" else []
    cold_runner(ws)
    res, data = restore(ws, store)
    assert data["result"] == "exact" and data["snapshot"].endswith(older.name), data
    assert data["damaged"] == ({"manifests": damaged} if damaged else None), data
    assert all(f"snapshot {d} is damaged" in res.stderr for d in damaged), res.stderr
    assert ws.build("build", "--offline").all_fresh()
    assert ws.run_app() == ws.expected_output
    status = rsnap(ws, store.url, "status", "--key", KEY, "--json").check().data["would_restore"]
    assert status["snapshot"].endswith(older.name) and status.get("damaged_manifests", []) == damaged, status


def test_any_damaged_packs_cost_only_their_units(saved, tmp_path_factory):
    """Property (hypothesis): whichever packs are missing, corrupt or truncated, the restore exits
    0 naming only those packs, cargo builds the right program and compiles no unit the restore did
    not leave out (none at all when only incremental dirs or downloads were hit)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    ws, source, clean_units = saved
    names = [p.relative_to(source).as_posix() for p in packs(source)]

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(names) - 1), st.sampled_from(["missing", "corrupt", "truncated"])),
                    min_size=1, max_size=3, unique_by=lambda t: t[0]))
    def check(hits):
        store = LocalStore(source, tmp_path_factory.mktemp("prop") / "store")
        for i, how in hits:
            store.damage(names[i], how)
        cold_runner(ws)
        res, data = restore(ws, store)
        damaged = data["damaged"] or {"packs": [], "units_left_out": 0}
        assert set(damaged["packs"]) <= {names[i].rsplit("/", 1)[-1] for i, _how in hits}, (hits, damaged)
        build = ws.build("build")
        assert ws.run_app() == ws.expected_output, (hits, build.summary())
        # cargo compiles only units the damage left out (a unit kept keeps its fingerprint and is fresh)
        assert len(build.compiled_units()) <= min(clean_units, damaged["units_left_out"]), (hits, damaged,
                                                                                            build.summary())
        shutil.rmtree(store.path)
    check()


def test_damaged_git_checkout_is_checked_out_again(saved, tmp_path):
    """A pack holding a file of a git checkout in CARGO_HOME: the checkout is left out whole (no
    `.cargo-ok` vouching for a partial dir), and cargo checks it out again."""
    from rsnap.repository import manifest as mf
    ws, source, _clean = saved
    store = LocalStore(source, tmp_path / "store")
    name = sorted((store.path / "snapshots" / KEY).iterdir())[-1]
    m = mf.loads(name.read_bytes())
    home = next(r for r in m.roots if r.name == "cargo_home")
    lib = next(e for e in home.entries if e.path.startswith("git/checkouts/") and e.path.endswith("/src/lib.rs"))
    pack, offset, clen, _size = m.blobs[lib.digest]
    path = store.path / "packs" / pack[:2] / pack
    data = bytearray(path.read_bytes())
    data[offset + clen // 2] ^= 0x55   # inside lib.rs's own blob
    path.write_bytes(bytes(data))
    cold_runner(ws)
    _res, data = restore(ws, store)
    assert data["damaged"]["packs"] == [pack], data["damaged"]
    checkout = ws.cargo_home / lib.path.rsplit("/src/lib.rs", 1)[0]
    assert not (checkout / ".cargo-ok").exists() and not (checkout / "src" / "lib.rs").exists()
    build = ws.build("build")   # online: the git db may have been in the same pack
    assert (checkout / ".cargo-ok").exists() and (checkout / "src" / "lib.rs").exists()
    assert ws.run_app() == ws.expected_output, build.summary()


@pytest.mark.parametrize("layout", ["legacy-outside", "new-outside"])
def test_damaged_pack_with_the_build_dir_outside_the_target_dir(registry, gitdep_url, tmp_path, layout):
    """The units live in the build dir and the target dir holds hard links into it: a missing pack
    costs its units there, the target's links to their files go with them."""
    ws = create_workspace(tmp_path / "ws", registry.index_url, gitdep_url, layout=layout)
    source, clean_units = build_and_save(ws)
    store = LocalStore(source, tmp_path / "damaged")
    store.damage(packs(source)[0].relative_to(source).as_posix(), "missing")
    cold_runner(ws)
    _res, data = restore(ws, store)
    damaged = data["damaged"]
    assert damaged["missing"] == 1 and damaged["units_left_out"] >= 1, damaged
    build = ws.build("build")
    assert 0 < len(build.compiled_units()) <= min(clean_units - 1, damaged["units_left_out"]), (damaged, build.summary())
    assert ws.run_app() == ws.expected_output
