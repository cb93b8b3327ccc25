"""`rsnap store check [--read-data] [--repair]` on local, s3 and tiered stores.

The store holds two real snapshots of the fixture workspace (saved once per module, under two
keys) and a third, `shared`, whose blobs are some of pack P's (the
pack with the most blobs) plus a pack of its own, Q: a snapshot that uses a pack the others use.
Each test copies that store into a fresh namespace of the backend and damages it.
"""
from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as hs

from rsnap import __version__
from rsnap.digest import digest_bytes
from rsnap.errors import EXIT_STORE
from rsnap.repository import manifest as mf, repo
from rsnap.store import LocalStore
from rsnap_util import rsnap


class Template:
    """The saved store, and what the tests need to know of it."""

    def __init__(self, store: LocalStore, full: list[str], shared: str, p: str, x: str, q: str):
        self.store, self.full, self.shared = store, full, shared
        self.p, self.x, self.q = p, x, q     # pack ids: P, blob X of P that `shared` leaves out, Q


@pytest.fixture(scope="module")
def template(built_workspace, tmp_path_factory) -> Template:
    path = tmp_path_factory.mktemp("check") / "store"
    for key in ("check-a", "check-b"):
        rsnap(built_workspace, path, "save", "--no-gc", "--key", key, "--json").check()
    st = LocalStore(path)
    full = [n for n, _k, _c in repo.list_snapshots(st)]
    blobs = repo.read_manifest(st, full[0]).blobs
    per_pack: dict[str, list[str]] = {}
    for digest, loc in blobs.items():
        per_pack.setdefault(loc[0], []).append(digest)
    p = max(per_pack, key=lambda k: len(per_pack[k]))
    x = max(per_pack[p], key=lambda d: blobs[d][2])       # P's largest blob
    shared_blobs = {d: blobs[d] for d in per_pack[p] if d != x}
    writer = repo.PackWriter(st)
    for i in range(3):
        content = f"only the shared snapshot has this {i}".encode()
        writer.add(digest_bytes(content), repo.compress(content), len(content))
    writer.flush()
    shared_blobs.update(writer.locations)
    (q,) = writer.pack_ids
    m = mf.Manifest(key="check-shared", created_ns=repo.now_ns(), workspace_root="/ws", cargo_home="/ch",
                    rsnap_version=__version__, key_inputs={}, roots=[], sources=[], source_dirs=[],
                    blobs=shared_blobs, chunks={})
    shared = repo.write_manifest(st, m)
    return Template(st, full, shared, p, x, q)


class Target:
    """A copy of the template store in one backend: `url`, `env` for the CLI, `store` a client."""

    def __init__(self, url: str, env: dict, store):
        self.url, self.env, self.store = url, env, store

    def check(self, *args: str, ws) -> tuple[int, dict]:
        res = rsnap(ws, self.url, "store", "check", "--json", *args, env_extra=self.env)
        assert "Traceback" not in res.stderr, res.stderr
        return res.returncode, res.data


@pytest.fixture(params=["local", "s3", "tiered"])
def target(request, template, tmp_path) -> Target:
    names = template.store.list()
    if request.param == "local":
        dest = LocalStore(tmp_path / "store")
        url, env = str(dest.root), {}
    else:
        pytest.importorskip("opendal")
        moto = request.getfixturevalue("moto_server")
        mp = request.getfixturevalue("monkeypatch")
        bucket = f"rsnap-check-{time.monotonic_ns()}"
        moto.create_bucket(bucket)
        env = {k: v for k, v in moto.env().items() if k.startswith("AWS_")}
        env.update(RSNAP_S3_RETRIES="1", RSNAP_S3_RETRY_MIN_DELAY="0.01")
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        for k, v in env.items():
            mp.setenv(k, v)
        url = f"s3://{bucket}/check"
        from rsnap.store.s3 import S3Store
        dest = S3Store(url)
        if request.param == "tiered":
            env["RSNAP_LOCAL_STORE"] = str(tmp_path / "tier")
    dest.put_many((n, template.store.get(n)) for n in names)
    return Target(url, env, dest)


def test_clean_store(target, template, built_workspace):
    code, out = target.check("--read-data", ws=built_workspace)
    assert code == 0 and out["snapshots_damaged"] == [] and out["packs_damaged"] == []
    assert out["snapshots_checked"] == 3 and out["packs_checked"] == len(target.store.list("packs/"))
    assert out["bytes_read"] == sum(s for _n, s, _m in target.store.stat_all("packs/"))


def test_a_missing_pack_damages_only_its_snapshots(target, template, built_workspace):
    target.store.delete(repo.pack_name(template.q))
    code, out = target.check(ws=built_workspace)
    assert code == EXIT_STORE
    assert [s["snapshot"] for s in out["snapshots_damaged"]] == [template.shared]
    assert out["packs_damaged"] == [{"pack": repo.pack_name(template.q), "problem": "missing"}]
    code, out = target.check("--repair", ws=built_workspace)
    assert code == 0 and out["snapshots_dropped"] == [template.shared] and out["packs_deleted"] == []
    assert target.store.list("snapshots/") == sorted(template.full)
    assert target.store.exists(repo.pack_name(template.p))
    code, out = target.check("--read-data", ws=built_workspace)
    assert code == 0 and out["snapshots_checked"] == 2 and out["snapshots_damaged"] == []


def test_a_corrupt_pack_is_found_by_reading_it(target, template, built_workspace):
    """A flipped byte in blob X of pack P: the pack's size is right, so only --read-data finds it,
    and only in the snapshots that use X. --repair keeps P, which `shared` still uses."""
    name = repo.pack_name(template.p)
    data = bytearray(target.store.get(name))
    loc = repo.read_manifest(template.store, template.full[0]).blobs[template.x]
    _pack, off, clen, _size = loc
    users = sorted(n for n in template.full if repo.read_manifest(template.store, n).blobs.get(template.x) == loc)
    data[off + clen // 2] ^= 0xFF
    target.store.put(name, bytes(data))
    code, out = target.check(ws=built_workspace)
    assert code == 0 and out["snapshots_damaged"] == []
    code, out = target.check("--read-data", ws=built_workspace)
    assert code == EXIT_STORE
    assert sorted(s["snapshot"] for s in out["snapshots_damaged"]) == users
    assert out["packs_damaged"][0]["pack"] == name and "corrupt" in out["packs_damaged"][0]["problem"]
    code, out = target.check("--read-data", "--repair", ws=built_workspace)
    assert code == 0 and sorted(out["snapshots_dropped"]) == users
    assert out["packs_deleted"] == [] and target.store.exists(name)
    code, out = target.check("--read-data", ws=built_workspace)
    assert code == 0 and out["snapshots_checked"] == 3 - len(users) and out["snapshots_damaged"] == []


def test_truncated_pack_and_unreadable_manifest(template, built_workspace, tmp_path):
    """Found without --read-data: a pack shorter than its blobs' locations, a manifest that is
    not one. --repair drops both snapshots, and deletes the truncated pack once nothing uses it."""
    st = LocalStore(tmp_path / "store")
    st.put_many((n, template.store.get(n)) for n in template.store.list())
    q = repo.pack_name(template.q)
    st.put(q, st.get(q)[:-5])
    st.put("snapshots/check-junk/1-ffff", b"not a manifest")
    res = rsnap(built_workspace, st.root, "store", "check")
    assert res.returncode == EXIT_STORE and "Traceback" not in res.stderr
    assert f"damaged {template.shared}: pack {template.q} truncated" in res.stderr
    assert "damaged snapshots/check-junk/1-ffff: manifest unreadable" in res.stderr
    assert res.stderr.strip().endswith("2 damaged snapshots (rsnap store check --repair drops them)")
    out = rsnap(built_workspace, st.root, "store", "check", "--repair", "--json").check().data
    assert sorted(out["snapshots_dropped"]) == sorted([template.shared, "snapshots/check-junk/1-ffff"])
    assert out["packs_deleted"] == [q] and not st.exists(q)
    rsnap(built_workspace, st.root, "store", "check", "--read-data").check()


def test_usage_and_a_store_that_cannot_be_read(built_workspace, tmp_path):
    res = rsnap(built_workspace, tmp_path / "store", "store", "check", "--bogus")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = rsnap(built_workspace, tmp_path / "none", "store", "check")
    assert res.returncode == EXIT_STORE and "Traceback" not in res.stderr and not (tmp_path / "none").exists()
    help_text = rsnap(built_workspace, tmp_path, "store", "check", "--help").check().stdout
    assert "--read-data" in help_text and "--repair" in help_text and "3 damage found" in help_text


# -- damage patterns (hypothesis): what check finds is exactly what a restore would miss ----------

PACKS, PER_PACK = 4, 3


def _synthetic_store(root, picks: list[set[int]]):
    """PACKS packs of PER_PACK random blobs each (incompressible: any flipped byte changes the
    content) and one snapshot per entry of `picks`, using those blob numbers."""
    store = LocalStore(root)
    writer, digests = repo.PackWriter(store), []
    for p in range(PACKS):
        for b in range(PER_PACK):
            content = os.urandom(2000 + 100 * b)
            digests.append(digest_bytes(content))
            writer.add(digests[-1], repo.compress(content), len(content))
        writer.ship()
    writer.flush()
    names = []
    for i, pick in enumerate(picks):
        m = mf.Manifest(key=f"k{i}", created_ns=repo.now_ns(), workspace_root="/ws", cargo_home="/ch",
                        rsnap_version=__version__, key_inputs={}, roots=[], sources=[], source_dirs=[],
                        blobs={digests[b]: writer.locations[digests[b]] for b in pick}, chunks={})
        names.append(repo.write_manifest(store, m))
    return store, [writer.locations[d] for d in digests], names


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=hs.lists(hs.sets(hs.integers(0, PACKS * PER_PACK - 1), min_size=1), min_size=1, max_size=4),
       damage=hs.lists(hs.sampled_from(["none", "delete", "truncate", "corrupt"]), min_size=PACKS, max_size=PACKS),
       victim=hs.integers(0, PER_PACK - 1))
def test_check_finds_exactly_the_damage(tmp_path_factory, picks, damage, victim):
    """Per pack: intact, deleted, cut inside its `victim` blob, or that blob's middle byte flipped.
    A snapshot is damaged iff it uses a lost blob (a corrupt one: only with read_data); --repair
    drops exactly those and deletes no pack a remaining snapshot uses."""
    from rsnap.repository import check
    store, locs, names = _synthetic_store(tmp_path_factory.mktemp("dmg") / "s", picks)
    pack_ids = sorted({loc[0] for loc in locs}, key=lambda p: min(i for i, loc in enumerate(locs) if loc[0] == p))
    lost, corrupt = set(), set()        # blob numbers
    for p, kind in enumerate(damage):
        pid, blob = pack_ids[p], p * PER_PACK + victim
        name, off, clen = repo.pack_name(pid), locs[blob][1], locs[blob][2]
        if kind == "delete":
            store.delete(name)
            lost |= set(range(p * PER_PACK, (p + 1) * PER_PACK))
        elif kind == "truncate":
            store.put(name, store.get(name)[:off + clen // 2])
            lost |= {b for b in range(p * PER_PACK, (p + 1) * PER_PACK) if locs[b][1] + locs[b][2] > off + clen // 2}
        elif kind == "corrupt":
            data = bytearray(store.get(name))
            data[off + clen // 2] ^= 0x55
            store.put(name, bytes(data))
            corrupt.add(blob)
    quick = check.check(store)
    assert {s["snapshot"] for s in quick["snapshots_damaged"]} == {n for n, pick in zip(names, picks) if pick & lost}
    full = check.check(store, read_data=True)
    bad = {n for n, pick in zip(names, picks) if pick & (lost | corrupt)}
    assert {s["snapshot"] for s in full["snapshots_damaged"]} == bad
    fixed = check.check(store, read_data=True, repair=True)
    assert set(fixed["snapshots_dropped"]) == bad and set(store.list("snapshots/")) == set(names) - bad
    still_used = {loc[0] for n, pick in zip(names, picks) if n not in bad for loc in (locs[b] for b in pick)}
    assert all(store.exists(repo.pack_name(p)) for p in still_used)
    assert check.check(store, read_data=True)["snapshots_damaged"] == []
