"""Shared cargo test harness: run cargo on the fixture workspace and parse its JSON.

Cargo behaviour this relies on (cargo 1.95, checked here):

* ``--message-format=json`` emits one ``compiler-artifact`` per unit, fresh or
  not, with ``"fresh": true|false``. A build script contributes two things: the
  *compile* of build.rs (a ``compiler-artifact`` with target kind
  ``custom-build``, name ``build-script-build``) and the *run*.
* The run is reported as ``build-script-executed`` on every build, *also when the
  run was fresh* (its recorded output is replayed); the message has no freshness
  flag. So :class:`BuildResult` runs cargo with ``-v`` and detects real runs from
  stderr's ``Running `<target>/.../build-script-build``` lines, matched against the
  executable paths listed in the custom-build compiler-artifacts.
* ``-v`` also prints ``Dirty <pkg> v<ver> (...): <reason>`` for every unit it
  rebuilds (e.g. "the file `crates/core/src/lib.rs` has changed (...)"), and
  ``Fresh <pkg> ...`` for fresh ones; :attr:`BuildResult.dirty_reasons` keeps them.
* package_id forms: ``path+file:///ws/crates/app#0.1.0`` (name omitted when it
  equals the last URL segment), ``path+file:///ws/crates/core#ws-core@0.1.0``,
  ``registry+https://github.com/rust-lang/crates.io-index#regdep@1.0.0`` (crates.io
  even though the loopback registry replaced it), ``git+file:///.../gitdep#0.1.0``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fixtures.tools import cargohome, materialize, mkgitdep, mkregistry  # noqa: E402
from fixtures.tools.common import cargo_env, git, run  # noqa: E402

# Package names of the fixture workspace (dirs under crates/ in brackets):
# ws-core [core] <- ws-util [util] <- app [app]; ws-macros [macros] (proc-macro, used
# by ws-util); ws-gen [gen] (build.rs reads data/words.txt; depends on ws-core).
WORKSPACE_PACKAGES = frozenset({"ws-core", "ws-util", "ws-macros", "ws-gen", "app"})
REGISTRY_PACKAGES = frozenset({"regbase", "regdep", "regsys"})
GIT_PACKAGES = frozenset({"gitdep"})
ALL_PACKAGES = WORKSPACE_PACKAGES | REGISTRY_PACKAGES | GIT_PACKAGES
CRATE_DIRS = {"ws-core": "crates/core", "ws-util": "crates/util", "ws-macros": "crates/macros",
              "ws-gen": "crates/gen", "app": "crates/app"}
# Packages with a build script (their runs show up in BuildResult.scripts_run).
BUILD_SCRIPT_PACKAGES = frozenset({"ws-gen", "regsys"})
INITIAL_REGDEP = "1.0.0"

# Cargo's build-dir layouts x where the build dir sits (rsnap.cargo.target_layout). "new" is the
# layout cargo 1.100 made the default, built here by cargo 1.95 behind -Zbuild-dir-new-layout.
NEW_LAYOUT_ENV = {"__CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS": "nightly", "CARGO_UNSTABLE_BUILD_DIR_NEW_LAYOUT": "true"}
LAYOUTS = ("legacy", "new-outside")          # what the parametrized suites run on
ALL_LAYOUTS = ("legacy", "legacy-outside", "new", "new-outside")


def layout_env(layout: str, root: Path) -> dict[str, str]:
    """Cargo env for a layout; "-outside": build.build-dir outside the workspace, beside it
    (`<root>.target`)."""
    env = dict(NEW_LAYOUT_ENV) if layout.startswith("new") else {}
    if layout.endswith("-outside"):
        # as long a path as <root>/target: what cargo writes (dep-info, debuginfo) is the same size
        env["CARGO_BUILD_BUILD_DIR"] = str(root.parent / f"{root.name}.target")
    return env


_DIRTY = re.compile(r"^\s*Dirty (\S+) v\S+(?: \([^)]*\))?: (.*)$")


def package_name(package_id: str) -> str:
    """Package name from a cargo package id (see module docstring for the forms)."""
    url, _, frag = package_id.partition("#")
    if "@" in frag:
        return frag.split("@")[0]
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def parse_messages(stdout: str) -> list[dict]:
    """JSON messages from cargo's stdout; non-JSON lines (test harness output) skipped."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


@dataclass(frozen=True)
class Unit:
    """One ``compiler-artifact``: a compiled (or fresh) target of a package."""
    package_id: str
    package: str
    target: str           # target name, e.g. "ws_core", "app", "build-script-build", "it"
    kind: str             # first target kind: lib, bin, proc-macro, custom-build, test, ...
    test: bool            # compiled in test mode (cargo test)
    fresh: bool
    filenames: tuple[str, ...]


@dataclass
class BuildResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    messages: list[dict] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    script_outputs: list[dict] = field(default_factory=list)  # build-script-executed messages
    scripts_run: set[str] = field(default_factory=set)        # packages whose build script ran
    dirty_reasons: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, args, proc: subprocess.CompletedProcess) -> "BuildResult":
        res = cls(list(args), proc.returncode, proc.stdout, proc.stderr, parse_messages(proc.stdout))
        scripts = {}  # build-script executable -> package name
        for m in res.messages:
            if m.get("reason") == "compiler-artifact":
                t = m["target"]
                unit = Unit(m["package_id"], package_name(m["package_id"]), t["name"], t["kind"][0],
                            bool(m["profile"]["test"]), bool(m["fresh"]), tuple(m["filenames"]))
                res.units.append(unit)
                if unit.kind == "custom-build":
                    scripts.update({f: unit.package for f in unit.filenames})
            elif m.get("reason") == "build-script-executed":
                res.script_outputs.append(m)
        for line in proc.stderr.splitlines():
            if line.lstrip().startswith("Running `"):
                res.scripts_run.update(pkg for exe, pkg in scripts.items() if f"{exe}`" in line)
            elif match := _DIRTY.match(line):
                res.dirty_reasons.setdefault(match[1], []).append(match[2])
        return res

    @property
    def success(self) -> bool:
        return self.returncode == 0

    def check(self) -> "BuildResult":
        if not self.success:
            raise AssertionError(f"cargo {' '.join(self.args)} failed ({self.returncode}):\n{self.stderr}")
        return self

    def compiled(self) -> set[str]:
        """Packages with at least one unit that was not fresh (build-script runs: see scripts_run)."""
        return {u.package for u in self.units if not u.fresh}

    def compiled_units(self) -> set[tuple[str, str, str]]:
        """(package, target name, kind) of every non-fresh unit."""
        return {(u.package, u.target, u.kind) for u in self.units if not u.fresh}

    def fresh(self) -> set[str]:
        """Packages all of whose units were fresh."""
        return {u.package for u in self.units} - self.compiled()

    def all_fresh(self) -> bool:
        """Nothing compiled and no build script ran."""
        return not self.compiled() and not self.scripts_run

    def summary(self) -> str:
        """Short human-readable account, for assertion messages."""
        return (f"compiled={sorted(self.compiled())} scripts_run={sorted(self.scripts_run)} "
                f"dirty={self.dirty_reasons}")


def run_cargo_json(root: Path, env: dict, *args: str) -> BuildResult:
    """``cargo <sub> --message-format=json -v <rest>`` in ``root`` (never raises)."""
    args = list(args) or ["build"]
    cmd = ["cargo", args[0], "--message-format=json", "-v", *args[1:]]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return BuildResult.parse(args, proc)


def normalize_output(text: str, root: Path) -> str:
    """App output with the workspace path (from env!(CARGO_MANIFEST_DIR)) as <ROOT>."""
    return text.replace(str(root), "<ROOT>")


def source_digest(root: Path) -> str:
    """Hash of every file's path and content in the worktree, minus target/ and .git/."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == str(root) and d in ("target", ".git")))
        for name in sorted(filenames):
            p = Path(dirpath, name)
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


_ORACLE_CACHE: dict[tuple, str] = {}
_ORACLE_POOL = None   # one thread: Workspace.start_clean_output


def clean_build_output(root: Path, cargo_home: Path, scratch: Path, *build_args: str) -> str:
    """Oracle: app output of a from-scratch build of the sources currently in ``root``.

    Builds at the same path (so env!(CARGO_MANIFEST_DIR) matches) but with a fresh
    target dir and a fresh CARGO_HOME (same config.toml) under ``scratch``, with
    ``--locked``, non-incremental (CARGO_INCREMENTAL=0: the program is the same, the oracle
    does not share rustc's incremental machinery with the builds it judges, and it builds in
    ~0.8 s instead of ~1.3 s). Cached per (root, args, source digest).
    """
    key = (str(root), build_args, source_digest(root))
    if key not in _ORACLE_CACHE:
        shutil.rmtree(scratch, ignore_errors=True)
        home = scratch / "cargo-home"
        home.mkdir(parents=True)
        shutil.copy2(Path(cargo_home) / "config.toml", home / "config.toml")
        env = cargo_env(home, CARGO_TARGET_DIR=str(scratch / "target"), CARGO_INCREMENTAL="0")
        run(["cargo", "build", "--locked", *build_args], cwd=root, env=env)
        _ORACLE_CACHE[key] = run([scratch / "target" / "debug" / "app"]).stdout
        shutil.rmtree(scratch, ignore_errors=True)
    return _ORACLE_CACHE[key]


class Workspace:
    """A materialized fixture workspace: a git worktree at ``root`` with its own
    bare ``origin`` repo (for :meth:`clone_fresh`) and ``cargo_home``."""

    def __init__(self, root: Path, origin: Path, cargo_home: Path, layout: str = "legacy"):
        self.root, self.origin, self.cargo_home = Path(root), Path(origin), Path(cargo_home)
        self.layout = layout
        self.env = cargo_env(self.cargo_home, **layout_env(layout, self.root))

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def build_dir(self) -> Path:
        """Where cargo keeps units: build.build-dir, else the target dir."""
        return Path(self.env.get("CARGO_BUILD_BUILD_DIR") or self.target)

    @property
    def app_path(self) -> Path:
        return self.target / "debug" / "app"

    def build(self, *args: str, check: bool = True) -> BuildResult:
        """``cargo <args> --message-format=json -v``; args default to ("build",)."""
        res = run_cargo_json(self.root, self.env, *args)
        return res.check() if check else res

    def cargo(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Plain cargo call (e.g. ``update -p regdep --precise 1.0.1``)."""
        return run(["cargo", *args], cwd=self.root, env=self.env, check=check)

    def run_app(self, *args: str) -> str:
        """Stdout of the built debug app binary."""
        return run([self.app_path, *args]).stdout

    def clean_output(self, *build_args: str) -> str:
        """Oracle: app output of a clean build of the current sources (see clean_build_output)."""
        scratch = self.root.parent / f"{self.root.name}.oracle"
        return clean_build_output(self.root, self.cargo_home, scratch, *build_args)

    def start_clean_output(self, *build_args: str):
        """clean_output() in a background thread: a Future. For a caller that builds the
        workspace meanwhile (the oracle has a target dir and CARGO_HOME of its own) and leaves
        the sources alone until it takes the result: the two builds share the machine's cores."""
        global _ORACLE_POOL
        if _ORACLE_POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _ORACLE_POOL = ThreadPoolExecutor(1, thread_name_prefix="oracle")
        return _ORACLE_POOL.submit(self.clean_output, *build_args)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def read(self, relpath: str) -> str:
        return self.path(relpath).read_text()

    def write(self, relpath: str, text: str) -> Path:
        p = self.path(relpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def append(self, relpath: str, text: str) -> Path:
        return self.write(relpath, self.read(relpath) + text)

    def replace(self, relpath: str, old: str, new: str) -> Path:
        text = self.read(relpath)
        assert old in text, f"{old!r} not in {relpath}"
        return self.write(relpath, text.replace(old, new))

    def git(self, *args: str) -> str:
        return git(*args, cwd=self.root)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def commit(self, message: str = "edit") -> str:
        """Commit everything (incl. Cargo.lock) and push to origin; returns the rev."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        self.git("push", "-q", "origin", "HEAD:main")
        return self.head()

    def clone_fresh(self, keep_target: bool = False, allow_dirty: bool = False) -> None:
        """Delete the worktree and ``git clone`` origin at the same absolute path:
        every source gets a new mtime and there is no target/ (unless
        ``keep_target``: the old target/ is moved back in, as a naive CI cache would)."""
        if not allow_dirty and self.git("status", "--porcelain"):
            raise AssertionError("uncommitted changes would be lost; commit() first")
        kept = self.root.parent / f"{self.root.name}.target-kept"
        shutil.rmtree(kept, ignore_errors=True)
        if keep_target and self.target.exists():
            self.target.rename(kept)
        if not keep_target and self.build_dir != self.target:
            shutil.rmtree(self.build_dir, ignore_errors=True)  # a new runner has no build dir either
        shutil.rmtree(self.root)
        git("clone", "-q", str(self.origin), str(self.root))
        if kept.exists():
            kept.rename(self.target)


def create_workspace(root: Path, index_url: str, gitdep_url: str, cargo_home: Path | None = None,
                     layout: str = "legacy") -> Workspace:
    """Materialize the template at ``root`` (must not exist). Siblings of ``root``:
    ``<name>.origin.git`` (bare clone source), by default ``<name>.cargo-home``, and for an
    "-outside" layout the build dir ``<name>.build-dir``. Cargo.lock pins regdep to INITIAL_REGDEP."""
    root = Path(root).resolve()
    cargo_home = Path(cargo_home or root.parent / f"{root.name}.cargo-home")
    cargohome.make_cargo_home(cargo_home, index_url)
    origin = root.parent / f"{root.name}.origin.git"
    materialize.materialize(root, cargo_home, gitdep_url, regdep_version=INITIAL_REGDEP)
    git("clone", "-q", "--bare", str(root), str(origin))
    git("remote", "add", "origin", str(origin), cwd=root)
    return Workspace(root, origin, cargo_home, layout)


__all__ = [
    "ALL_LAYOUTS", "ALL_PACKAGES", "BUILD_SCRIPT_PACKAGES", "LAYOUTS", "layout_env", "BuildResult", "CRATE_DIRS", "GIT_PACKAGES",
    "INITIAL_REGDEP", "REGISTRY_PACKAGES", "Unit", "WORKSPACE_PACKAGES", "Workspace",
    "cargo_env", "clean_build_output", "create_workspace", "mkgitdep", "mkregistry",
    "normalize_output", "package_name", "parse_messages", "run_cargo_json", "source_digest",
]
