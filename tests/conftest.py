"""Shared pytest fixtures: loopback registry, git dependency, fixture workspaces.

Fixtures
--------
registry (session)          RegistryServer: .url, .index_url, .port, .requests, .downloads(), .stop()
gitdep_repo (session)       Path of the local git repo holding the gitdep crate
gitdep_url (session)        its file:// URL (what the workspace's Cargo.toml points at)
cargo_env                   factory: cargo_env(cargo_home, **extra) -> env dict for subprocess
make_cargo_home             factory: make_cargo_home(path=None) -> Path of a configured CARGO_HOME
make_workspace              factory: make_workspace(path=None, cargo_home=None, gitdep=None, layout="legacy")
layout (session, params)    each of cargo_util.LAYOUTS: "legacy" (build dir = target dir) and "new-outside"
                            (cargo 1.100's layout, build.build-dir outside the workspace)
built_workspace (session)   a Workspace built once per session (don't mutate; copy from it)
template_output (session)   clean-build app output of the unedited template, normalized (<ROOT>)
moto_server, fault_proxy    S3 server and fault proxy (tests/s3_fixtures.py)

RSNAP_TEST_REQUIRE=all (set by .ci/run): every skip is a failure, so CI cannot go green with an
area (BuildKit, Earthly, tmpfs, read-only store, capability drop, gc, a second toolchain, moto)
left untested. Without it, tests skip where the machine lacks something. Either way the run
ends with the list of skips.

Set RSNAP_TEST_REGISTRY_PORT to pin the registry port (cargo's registry dir names
under $CARGO_HOME hash the index URL, so they change with the port).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cargo_util import (LAYOUTS, Workspace, cargo_env as _cargo_env, create_workspace, mkgitdep,
                        mkregistry, normalize_output)
from fixtures.tools import cargohome

pytest_plugins = ["s3_fixtures", "buildkit_fixtures", "gha_fixtures"]  # moto_server, fault_proxy; buildkit, buildkit_session; azurite, gha_server, gha_store

REQUIRE_ALL = os.environ.get("RSNAP_TEST_REQUIRE") == "all"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under RSNAP_TEST_REQUIRE=all a skip (in setup or in the test) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"RSNAP_TEST_REQUIRE=all: CI must not skip this test ({reason})"


def pytest_terminal_summary(terminalreporter):
    """The last lines of every run: what was skipped and why (empty under RSNAP_TEST_REQUIRE=all)."""
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.section(f"rsnap: {len(skipped)} skipped", sep="-")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.write_line(f"SKIPPED {rep.nodeid}: {reason}")
    util = sys.modules.get("reliability_util")
    if util and util.LANDED_KILLS:
        kills = util.LANDED_KILLS
        terminalreporter.write_line(f"rsnap: {sum(kills.values())} kills landed at {len(kills)} fault points: "
                                    + ", ".join(f"{k}={v}" for k, v in sorted(kills.items())))


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    root = mkregistry.build_registry(mkregistry.default_crate_dirs(), tmp_path_factory.mktemp("registry"))
    server = mkregistry.serve(root, int(os.environ.get("RSNAP_TEST_REGISTRY_PORT", "0")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gitdep_repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gitdep") / "gitdep"
    mkgitdep.make_gitdep(path)
    return path


@pytest.fixture(scope="session")
def gitdep_url(gitdep_repo) -> str:
    return gitdep_repo.as_uri()


@pytest.fixture
def cargo_env():
    return _cargo_env


@pytest.fixture
def make_cargo_home(registry, tmp_path_factory):
    def make(path: Path | None = None) -> Path:
        path = path or tmp_path_factory.mktemp("cargo-home")
        return cargohome.make_cargo_home(path, registry.index_url)
    return make


@pytest.fixture
def make_workspace(registry, gitdep_url, tmp_path_factory):
    """Factory. ``path``: the workspace root (must not exist; default a fresh tmp dir/ws).
    ``cargo_home``: share one CARGO_HOME (default: a new one beside the root).
    ``gitdep``: URL of another gitdep repo (e.g. one the test will commit to)."""
    def make(path: Path | None = None, cargo_home: Path | None = None,
             gitdep: str | None = None, layout: str = "legacy") -> Workspace:
        path = Path(path) if path else tmp_path_factory.mktemp("ws") / "ws"
        return create_workspace(path, registry.index_url, gitdep or gitdep_url, cargo_home, layout)
    return make


@pytest.fixture(scope="session", params=LAYOUTS)
def layout(request) -> str:
    """A suite taking this runs once per layout in cargo_util.LAYOUTS."""
    return request.param


@pytest.fixture(scope="session")
def built_workspace(registry, gitdep_url, tmp_path_factory) -> Workspace:
    ws = create_workspace(tmp_path_factory.mktemp("built") / "ws", registry.index_url, gitdep_url)
    ws.build()
    return ws


@pytest.fixture(scope="session")
def template_output(built_workspace) -> str:
    return normalize_output(built_workspace.run_app(), built_workspace.root)
