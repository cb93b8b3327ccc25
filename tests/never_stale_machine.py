"""A hypothesis state machine for "a restored build is never stale" (tests/test_never_stale_machine.py
runs it in CI; bench/bench_never_stale.py runs it for minutes).

State: one repository (origin + a runner's worktree), one local store, the build configuration
(RUSTFLAGS, features, profile). It is rebuilt at the start of every example (empty store, the
worktree and origin back at the initial commit, no target/, a cold CARGO_HOME), so a shrunk
failure replays from the same start.

Rules: a CI run on a fresh or persistent runner, with commit-time or fresh mtimes, edits before
or after the restore, a partial or full restore, sometimes killed at a fault point (then
repaired by the next restore); configuration changes; gc; a save killed at a fault point; prune.
Every rule ends with the oracle: `cargo build` succeeds; the program prints what a clean build
of the same sources and configuration prints; an immediate second build is all fresh by cargo's
own JSON; and `rsnap explain` reports exactly the units cargo compiled. Every kill must land
(reliability_util.run_killed). Counters: STATS (steps, kills, gc, prunes, stale_builds).
"""
from __future__ import annotations

import collections
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cargo_util import Workspace, run_cargo_json, source_digest
from fixtures.tools.common import cargo_env, run
from reliability_util import OLD_MTIME_NS, check_store, run_killed, run_rsnap, set_source_mtimes
from rsnap_util import cargo_sets, rebuild_sets
from test_never_stale import OPS, apply_op

STATS: collections.Counter = collections.Counter()

RUSTFLAGS = ["", "-C overflow-checks=on", "--cfg rsnap_probe"]
FEATURES = ["", "app/shout"]
PROFILES = ["dev", "release"]
RESTORE_KILLS = ["restore.marker:1", "restore.*:2", "restore.done:1"]   # every hit passes these
SAVE_KILLS = ["save.manifest:1", "store.snapshots.tmp:1", "store.snapshots:1"]  # every save passes these


@dataclass
class Scene:
    """Built once per pytest module (or bench run); reset() puts it back in the start state."""
    ws: Workspace
    store: Path
    initial: str


def make_scene(ws: Workspace) -> Scene:
    ws.git("tag", "-f", "origin-initial")
    ws.git("push", "-qf", "origin", "origin-initial")
    return Scene(ws, ws.root.parent / "machine-store", ws.head())


_ORACLE: dict = {}
_POOL = ThreadPoolExecutor(1, thread_name_prefix="machine-oracle")


def oracle(ws: Workspace, config: dict) -> str:
    """The program's output after a clean build of the current sources with `config` (its own
    target dir and CARGO_HOME, at the same path). Cached by sources and configuration."""
    key = (source_digest(ws.root), tuple(sorted(config.items())))
    if key not in _ORACLE:
        scratch = ws.root.parent / "machine-oracle"
        shutil.rmtree(scratch, ignore_errors=True)
        home = scratch / "cargo-home"
        home.mkdir(parents=True)
        shutil.copy2(ws.cargo_home / "config.toml", home / "config.toml")
        env = cargo_env(home, CARGO_TARGET_DIR=str(scratch / "target"), CARGO_INCREMENTAL="0",
                        RUSTFLAGS=config["rustflags"])
        run(["cargo", "build", "--locked", *build_args(config)], cwd=ws.root, env=env)
        _ORACLE[key] = run([scratch / "target" / profile_dir(config) / "app"]).stdout
        shutil.rmtree(scratch, ignore_errors=True)
    return _ORACLE[key]


def build_args(config: dict) -> list[str]:
    return (["--features", config["features"]] if config["features"] else []) + \
        (["--release"] if config["profile"] == "release" else [])


def profile_dir(config: dict) -> str:
    return "release" if config["profile"] == "release" else "debug"


class NeverStale(RuleBasedStateMachine):
    scene: Scene   # set by the test (or bench) before the machine runs

    @initialize()
    def start(self):
        """The start state, the same for every example."""
        s = self.scene
        shutil.rmtree(s.store, ignore_errors=True)
        s.ws.git("push", "-qf", "origin", f"{s.initial}:main")
        s.ws.clone_fresh(allow_dirty=True)
        for sub in ("registry", "git"):
            shutil.rmtree(s.ws.cargo_home / sub, ignore_errors=True)
        self.config = {"rustflags": "", "features": "", "profile": "dev"}
        self.snapshots = 0      # saves that completed
        self.runs = 0

    # ------------------------------------------------------------ helpers

    @property
    def ws(self) -> Workspace:
        return self.scene.ws

    def env(self) -> dict:
        return {"RUSTFLAGS": self.config["rustflags"]}

    def rsnap(self, *args: str, env: dict | None = None):
        return run_rsnap(self.ws, self.scene.store, *args, env_extra={**self.env(), **(env or {})})

    def build_and_check(self, what: str, explain: bool = False) -> None:
        """The oracle of every step; `explain`: the build is the first since a restore that hit."""
        env = {**self.ws.env, **self.env()}
        expected_later = _POOL.submit(oracle, self.ws, self.config)   # builds while cargo builds here
        build = run_cargo_json(self.ws.root, env, "build", *build_args(self.config))
        assert build.success, f"{what}: cargo build failed:\n{build.stderr[-3000:]}"
        app = self.ws.target / profile_dir(self.config) / "app"
        got = subprocess.run([app], capture_output=True, text=True, check=True).stdout
        expected = expected_later.result()
        if got != expected:
            STATS["stale_builds"] += 1
            raise AssertionError(f"STALE build ({what}, {self.config}): {build.summary()}\n"
                                 f"got:\n{got}\nexpected:\n{expected}")
        again = run_cargo_json(self.ws.root, env, "build", *build_args(self.config))
        assert again.success and again.all_fresh(), f"{what}: a second build is not fresh: {again.summary()}"
        if explain:
            explained = self.rsnap("explain", "--json").check().data
            assert rebuild_sets(explained["rebuilt"]) == cargo_sets(build), (what, explained["rebuilt"], build.summary())
        STATS["steps"] += 1   # every rule ends here

    def restore(self, mode: str, kill: str | None) -> bool:
        """Restore (killed first, then repaired, if `kill`); True if it hit."""
        env = {"RSNAP_FULL_RESTORE": "1"} if mode == "full" else {}
        if kill:
            run_killed(self.ws, self.scene.store, kill, "restore", "--json", env_extra={**self.env(), **env})
            STATS["kills"] += 1
        done = self.rsnap("restore", "--json", env=env).check().data
        assert done.get("repaired_interrupted_restore", False) is bool(kill), (kill, done)
        return done["result"] != "miss"

    def save(self) -> None:
        self.rsnap("save", "--json").check()
        self.snapshots += 1

    # ------------------------------------------------------------ rules

    RUN = dict(cold_home=st.booleans(), old_mtimes=st.sampled_from([None, 0, 10**15]), ops=st.lists(OPS, max_size=3),
               edit_after=st.booleans(), mode=st.sampled_from(["partial", "full"]),
               kill=st.sampled_from([None, None, *RESTORE_KILLS]))

    @rule(**RUN)
    def fresh_runner(self, **run):
        """A CI job on a new machine: a fresh clone (new mtimes, no target/)."""
        self.ws.clone_fresh(allow_dirty=True)
        self.ci_run("fresh", **run)

    @rule(**RUN)
    def persistent_runner(self, **run):
        """A CI job on the machine of the last one: its worktree and target/ are still there."""
        self.ci_run("persistent", **run)

    def ci_run(self, runner, cold_home, old_mtimes, ops, edit_after, mode, kill):
        """Check out, restore, build (checked), save, push."""
        ws = self.ws
        if cold_home:
            for sub in ("registry", "git"):
                shutil.rmtree(ws.cargo_home / sub, ignore_errors=True)
        if old_mtimes is not None:   # git-restore-mtime: sources as old as their commit
            set_source_mtimes(ws, OLD_MTIME_NS + old_mtimes)
        for op in ([] if edit_after else ops):
            apply_op(ws, op)
        hit = self.restore(mode, kill if self.snapshots else None)   # a kill lands only on a hit
        for op in (ops if edit_after else []):
            apply_op(ws, op)
        self.build_and_check(f"{runner} runner: old_mtimes={old_mtimes} ops={ops} edit_after={edit_after} "
                             f"{mode} kill={kill}", explain=hit)
        self.save()
        self.runs += 1
        ws.commit(f"ci run {self.runs}")

    @rule(rustflags=st.sampled_from(RUSTFLAGS), features=st.sampled_from(FEATURES),
          profile=st.sampled_from(PROFILES))
    def change_config(self, rustflags, features, profile):
        """The job's build configuration changes (its next runs build with it); this runner builds now."""
        self.config = {"rustflags": rustflags, "features": features, "profile": profile}
        self.build_and_check(f"config changed to {self.config}")

    @precondition(lambda self: self.runs > 0)
    @rule()
    def gc(self):
        self.rsnap("gc").check()
        STATS["gc"] += 1
        self.build_and_check("after gc")

    @precondition(lambda self: self.snapshots > 0)
    @rule(point=st.sampled_from(SAVE_KILLS))
    def killed_save(self, point):
        """A save killed at a fault point: the store stays complete (invariant), a fresh runner
        restores what is there and builds right."""
        run_killed(self.ws, self.scene.store, point, "save", "--json", env_extra=self.env())
        STATS["kills"] += 1
        self.snapshots += point == "store.snapshots"   # killed after the manifest's rename
        self.ws.clone_fresh(allow_dirty=True)
        self.restore("partial", None)
        self.build_and_check(f"fresh runner after a save killed at {point}")

    @precondition(lambda self: self.snapshots > 1)
    @rule(keep=st.integers(1, 2))
    def prune(self, keep):
        self.rsnap("store", "prune", "--keep", str(keep), "--grace", "0", "--json").check()
        STATS["prunes"] += 1
        self.ws.clone_fresh(allow_dirty=True)
        self.restore("partial", None)
        self.build_and_check(f"fresh runner after prune --keep {keep}")

    @invariant()
    def store_complete(self):
        if self.scene.store.exists():
            check_store(self.scene.store)

