"""Every fault point in rsnap (rsnap/faults.py) takes a kill that lands, and what follows is right.

`declared_points()` reads the point names out of rsnap's sources; every one must have a
scenario here (or, for the compile cache's, in tests/test_wrapper_stress.py). Each scenario
kills the command at its point (the process must die by SIGKILL: reliability_util.run_killed)
and then checks the build: the same runner's next restore repairs and its build prints what a
clean build prints, or (when the store was being written) a fresh runner restores and does.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

import pytest

from cargo_util import REPO_ROOT, create_workspace
from reliability_util import check_store, checkout, copy_tree, run_killed, run_rsnap, trace_points

# Object prefixes a store-level point's f-string name expands over (store.<prefix>[.tmp]).
OBJECT_PREFIXES = ("packs", "snapshots", "cache")
RESTORE_POINTS = ["restore.marker", "restore.invalidate", "restore.remove", "restore.write", "restore.retime",
                  "restore.link", "restore.meta", "restore.publish", "restore.done"]
SAVE_POINTS = ["save.file", "store.packs.tmp", "store.packs", "save.manifest", "save.commit", "store.snapshots.tmp",
               "store.snapshots"]
GC_POINTS = ["gc", "gc.trash", "gc.empty_trash"]


def declared_points() -> set[str]:
    """The fault point names in rsnap's sources: faults.point("x") / _fault_point("x"), with an
    f-string's `{...}` expanded over OBJECT_PREFIXES."""
    names = set()
    for path in (REPO_ROOT / "rsnap").rglob("*.py"):
        for name in re.findall(r'(?:faults\.point|_fault_point)\(f?"([^"]+)"\)', path.read_text()):
            if "{" in name:
                names |= {re.sub(r"\{[^}]*\}", prefix, name) for prefix in OBJECT_PREFIXES}
            else:
                names.add(name)
    return names


def test_every_declared_fault_point_has_a_kill_scenario():
    from test_wrapper_stress import KILL_POINTS as CACHE_POINTS
    covered = set(RESTORE_POINTS) | set(SAVE_POINTS) | set(GC_POINTS) | set(CACHE_POINTS) | set(PRUNE_POINTS) | \
        set(REMOTE_SAVE_POINTS) | set(REMOTE_RESTORE_POINTS) | set(REMOTE_PRUNE_POINTS)
    declared = declared_points()
    assert len(declared) >= 20, declared      # the parser still finds them
    assert declared - covered == set(), "fault points without a kill scenario"
    assert covered - declared == set(), "scenarios of fault points that no longer exist"


class Scene:
    """c1 built and saved, then c2 (core's REVISION, gen's words) built and saved; t1: c1's target."""

    def __init__(self, ws, store: Path, t1: Path, revs: dict):
        self.ws, self.store, self.t1, self.revs = ws, store, t1, revs
        self.expected = {}

    def output(self, rev: str) -> str:
        if rev not in self.expected:
            checkout(self.ws, self.revs[rev])
            self.expected[rev] = self.ws.clean_output()
        return self.expected[rev]


@pytest.fixture(scope="module")
def scene(registry, gitdep_url, tmp_path_factory) -> Scene:
    base = tmp_path_factory.mktemp("points")
    ws = create_workspace(base / "ws", registry.index_url, gitdep_url)
    store = base / "store"
    c1 = ws.head()
    ws.build("build")
    copy_tree(ws.target, base / "t1")
    run_rsnap(ws, store, "save").check()
    ws.replace("crates/core/src/lib.rs", "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 5;")
    ws.write("crates/gen/data/words.txt", "alpha beta zeta\n")
    c2 = ws.commit("c2")
    ws.build("build")
    run_rsnap(ws, store, "save").check()
    return Scene(ws, store, base / "t1", {"c1": c1, "c2": c2})


def _fresh_runner_builds_right(scene: Scene, what: str, store=None) -> None:
    """A new machine: fresh clone of c2, cold CARGO_HOME, restore, build; the program is right."""
    ws = scene.ws
    expected = scene.output("c2")
    checkout(ws, scene.revs["c2"])
    ws.clone_fresh(allow_dirty=True)
    shutil.rmtree(ws.cargo_home / "registry", ignore_errors=True)
    run_rsnap(ws, store or scene.store, "restore", "--json", env_extra=getattr(scene, "aws", {})).check()
    ws.build("build")
    assert ws.run_app() == expected, f"STALE build on a fresh runner after {what}"


# ---------------------------------------------------------------- restore

def _restore_start(scene: Scene, state: str) -> None:
    """fresh: c2 sources, no target, cold CARGO_HOME. persistent: c2 sources over c1's target."""
    ws = scene.ws
    checkout(ws, scene.revs["c2"])
    shutil.rmtree(ws.target, ignore_errors=True)
    if state == "persistent":
        copy_tree(scene.t1, ws.target)
    else:
        shutil.rmtree(ws.cargo_home / "registry", ignore_errors=True)


@pytest.fixture(scope="module")
def restore_paths(scene, tmp_path_factory) -> dict:
    """point -> a start state whose restore passes it (from a traced restore of each state)."""
    tmp = tmp_path_factory.mktemp("trace")
    paths = {}
    for state in ("persistent", "fresh"):
        _restore_start(scene, state)
        res, counts, _ = trace_points(scene.ws, scene.store, tmp, "restore", "--json")
        res.check()
        paths.update({name: state for name in counts})
    return paths


@pytest.mark.parametrize("point", RESTORE_POINTS)
def test_restore_killed_at(scene, restore_paths, point):
    ws = scene.ws
    assert point in restore_paths, f"no start state here passes {point}: {sorted(restore_paths)}"
    _restore_start(scene, restore_paths[point])
    run_killed(ws, scene.store, f"{point}:1", "restore", "--json")
    assert (ws.target / ".rsnap" / "restoring").exists()
    again = run_rsnap(ws, scene.store, "restore", "--json").check().data
    assert again["repaired_interrupted_restore"] is True
    ws.build("build")
    assert ws.run_app() == scene.output("c2"), f"STALE build after a restore killed at {point}"


# ---------------------------------------------------------------- save

@pytest.mark.parametrize("point", SAVE_POINTS)
def test_save_killed_at(scene, tmp_path, point):
    """A save of new content killed at `point`: every snapshot stays complete, a snapshot shows
    only once its manifest is in place, and a fresh runner restores and builds right."""
    ws = scene.ws
    store = tmp_path / "store"
    shutil.copytree(scene.store, store)
    before = check_store(store)["snapshots"]
    checkout(ws, scene.revs["c2"])
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 77;")
    ws.build("build")
    run_killed(ws, store, f"{point}:1", "save", "--json")
    assert check_store(store)["snapshots"] == before + (point == "store.snapshots")
    _fresh_runner_builds_right(scene, f"a save killed at {point}", store)


# ---------------------------------------------------------------- gc

@pytest.mark.parametrize("point", GC_POINTS)
def test_gc_killed_at(scene, point):
    """`rsnap gc` killed at `point` in a target with garbage (c1's units under c2's build, another
    regdep): the next build is right, and a complete gc after it too."""
    ws = scene.ws
    _restore_start(scene, "persistent")
    run_rsnap(ws, scene.store, "restore", "--json").check()
    ws.cargo("update", "-p", "regdep", "--precise", "1.1.0")   # the restored regdep units become garbage
    ws.build("build")
    expected = ws.clean_output()
    run_killed(ws, scene.store, f"{point}:1", "gc")
    ws.build("build")
    assert ws.run_app() == expected, f"STALE build after gc killed at {point}"
    run_rsnap(ws, scene.store, "gc").check()
    assert not (ws.target / ".rsnap" / "trash").exists()
    ws.build("build")
    assert ws.run_app() == expected, f"STALE build after a complete gc following one killed at {point}"
    checkout(ws, scene.revs["c2"])


# ---------------------------------------------------------------- prune (local store)

PRUNE_POINTS = ["prune.packs"]   # the manifests are deleted, their packs not yet


def _store_to_prune(scene: Scene, store) -> None:
    """Snapshots of c1 and c2 under one key (prune --keep 1 deletes c1's), and the packs of a
    save killed before its manifest (referenced by nothing: prune --grace 0 deletes them)."""
    ws = scene.ws
    env = {} if isinstance(store, Path) else scene.aws
    _restore_start(scene, "fresh")
    for rev in ("c1", "c2"):
        checkout(ws, scene.revs[rev])
        ws.build("build")
        run_rsnap(ws, store, "save", "--json", env_extra=env).check()
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 79;")
    ws.build("build")
    run_killed(ws, store, "save.manifest:1", "save", "--json", env_extra=env)
    checkout(ws, scene.revs["c2"])


def test_prune_killed_at_each_point(scene, tmp_path):
    """One store, pruned again after each kill (what a later prune meets)."""
    store = tmp_path / "store"
    _store_to_prune(scene, store)
    for point in PRUNE_POINTS:
        run_killed(scene.ws, store, f"{point}:1", "store", "prune", "--keep", "1", "--grace", "0", "--json")
        assert check_store(store)["snapshots"] == 1
        _fresh_runner_builds_right(scene, f"prune killed at {point}", store)


# ---------------------------------------------------------------- S3 store, local tier, cache sync

REMOTE_SAVE_POINTS = ["remote.put.packs", "remote.packs", "remote.put.snapshots", "remote.snapshots",
                      "remote.put.cache", "remote.cache"]
REMOTE_RESTORE_POINTS = ["tier.fill", "cache_sync.down"]
REMOTE_PRUNE_POINTS = ["remote.delete.snapshots", "remote.delete.packs", "remote.delete.cache"]


@pytest.fixture(scope="module")
def bucket(scene, moto_server):
    """A bucket, and the AWS environment in this process too (for the in-process checks)."""
    moto_server.create_bucket("points")
    scene.aws = {k: v for k, v in moto_server.env().items() if k.startswith("AWS_")}
    scene.aws["RSNAP_S3_LOCK_STALE"] = "3"   # the lock of a killed save or prune is stale in 3 s
    saved = dict(os.environ)
    os.environ.update(scene.aws)
    yield "s3://points"
    os.environ.clear()
    os.environ.update(saved)


def _put_cache_objects(store, n: int = 3) -> dict[str, bytes]:
    """Compile-cache objects: the sync moves them as opaque bytes, it never reads them."""
    objs = {f"cache/{secrets.token_hex(1)}/{secrets.token_hex(16)}": secrets.token_bytes(20000) for _ in range(n)}
    for name, data in objs.items():
        store.put(name, data)
    return objs


def _assert_remote_complete(url: str) -> int:
    """Every snapshot in the S3 store names only packs that are there; returns their count."""
    from rsnap.repository import repo
    from rsnap.store import open_store
    store = open_store(url)
    names = [n for n, _k, _c in repo.list_snapshots(store)]
    for name in names:
        packs = {loc[0] for loc in repo.read_manifest(store, name).blobs.values()}
        assert not store.missing([repo.pack_name(p) for p in packs]), f"{name} points at a missing pack"
    return len(names)


@pytest.fixture(scope="module")
def save_bucket(scene, bucket) -> str:
    """An S3 prefix with c2's snapshot (what a fresh runner restores if a killed save adds none)."""
    url = f"{bucket}/save"
    _restore_start(scene, "fresh")
    scene.ws.build("build")
    run_rsnap(scene.ws, url, "save", "--json", env_extra=scene.aws).check()
    return url


@pytest.mark.parametrize("point", REMOTE_SAVE_POINTS)
def test_s3_save_killed_at(scene, save_bucket, tmp_path, point):
    """A save to S3 through a local tier that holds new compile-cache entries (uploaded last)."""
    from rsnap.store import LocalStore
    ws = scene.ws
    url = save_bucket
    tier = tmp_path / "tier"
    _put_cache_objects(LocalStore(tier))
    checkout(ws, scene.revs["c2"])
    ws.replace("crates/app/src/main.rs", "const APP_REVISION: u32 = 1;", "const APP_REVISION: u32 = 78;")
    ws.build("build")
    before = _assert_remote_complete(url)
    run_killed(ws, url, f"{point}:1", "save", "--json", env_extra={**scene.aws, "RSNAP_LOCAL_STORE": str(tier)})
    assert _assert_remote_complete(url) == before + (point in ("remote.snapshots", "remote.put.cache", "remote.cache"))
    _fresh_runner_builds_right(scene, f"an S3 save killed at {point}", url)


@pytest.fixture(scope="module")
def restore_bucket(scene, bucket) -> tuple[str, dict]:
    """An S3 prefix with c2's snapshot and compile-cache objects."""
    from rsnap.store import open_store
    url = f"{bucket}/restore"
    _restore_start(scene, "fresh")
    scene.ws.build("build")
    run_rsnap(scene.ws, url, "save", "--json", env_extra={**scene.aws, "RSNAP_CACHE_SYNC": "0"}).check()
    return url, _put_cache_objects(open_store(url))


@pytest.mark.parametrize("point", REMOTE_RESTORE_POINTS)
def test_s3_restore_through_a_tier_killed_at(scene, restore_bucket, tmp_path, point):
    """A fresh runner's restore from S3 filling an empty local tier, killed at `point`: what the
    tier holds is whole, and the next restore and build are right."""
    from rsnap.store import LocalStore, open_store
    url, cache_objects = restore_bucket
    ws = scene.ws
    tier = tmp_path / "tier"
    env = {**scene.aws, "RSNAP_LOCAL_STORE": str(tier)}
    _restore_start(scene, "fresh")
    k = 2 if point == "tier.fill" else 1   # tier.fill comes before its copy: the second, after one
    run_killed(ws, url, f"{point}:{k}", "restore", "--json", env_extra=env)
    remote, local = open_store(url), LocalStore(tier)
    held = local.list("")
    assert held, "the kill came before anything reached the tier"
    for name in held:
        assert local.get(name) == remote.get(name), f"{name} in the local tier is not whole"
    run_rsnap(ws, url, "restore", "--json", env_extra=env).check()
    assert set(cache_objects) <= set(local.list("cache/"))
    ws.build("build")
    assert ws.run_app() == scene.output("c2"), f"STALE build after a tiered restore killed at {point}"


def test_s3_prune_killed_at_each_point(scene, bucket):
    """prune of an S3 store killed after its first delete of each kind, pruned again after each
    kill: no manifest points at a deleted pack, and a fresh runner builds right."""
    from rsnap.store import open_store
    url = f"{bucket}/prune"
    _store_to_prune(scene, url)
    _put_cache_objects(open_store(url))
    for point in REMOTE_PRUNE_POINTS:   # snapshots (c1's), packs (the killed save's), cache (all: 0s)
        args = ("--keep", "1") + (("--older-than", "0s") if point == "remote.delete.cache" else ())
        run_killed(scene.ws, url, f"{point}:1", "store", "prune", *args, "--grace", "0", "--json", env_extra=scene.aws)
        _assert_remote_complete(url)
        _fresh_runner_builds_right(scene, f"an S3 prune killed at {point}", url)
