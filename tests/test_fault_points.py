"""Every fault point in rsnap (rsnap/faults.py) takes a kill that lands, and what follows is right.

`declared_points()` reads the point names out of rsnap's sources; every one must have a
scenario here (or, for the compile cache's, in tests/test_wrapper_stress.py). Each scenario
kills the command at its point (the process must die by SIGKILL: reliability_util.run_killed)
and then checks the build: the same runner's next restore repairs and its build prints what a
clean build prints, or (when the store was being written) a fresh runner restores and does.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from cargo_util import REPO_ROOT, create_workspace
from reliability_util import check_store, checkout, copy_tree, run_killed, run_rsnap, trace_points

# Object prefixes a store-level point's f-string name expands over (store.<prefix>[.tmp]).
OBJECT_PREFIXES = ("packs", "snapshots", "cache")
RESTORE_POINTS = ["restore.marker", "restore.invalidate", "restore.remove", "restore.write", "restore.retime",
                  "restore.link", "restore.meta", "restore.publish", "restore.done"]
SAVE_POINTS = ["save.file", "store.packs.tmp", "store.packs", "save.manifest", "store.snapshots.tmp",
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
    covered = set(RESTORE_POINTS) | set(SAVE_POINTS) | set(GC_POINTS) | set(CACHE_POINTS)
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


def _fresh_runner_builds_right(scene: Scene, what: str) -> None:
    """A new machine: fresh clone of c2, cold CARGO_HOME, restore, build; the program is right."""
    ws = scene.ws
    checkout(ws, scene.revs["c2"])
    ws.clone_fresh(allow_dirty=True)
    shutil.rmtree(ws.cargo_home / "registry", ignore_errors=True)
    run_rsnap(ws, scene.store, "restore", "--json").check()
    ws.build("build")
    assert ws.run_app() == scene.output("c2"), f"STALE build on a fresh runner after {what}"


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
    scene_store, scene.store = scene.store, store
    try:
        _fresh_runner_builds_right(scene, f"a save killed at {point}")
    finally:
        scene.store = scene_store


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
