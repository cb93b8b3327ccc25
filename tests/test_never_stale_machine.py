"""The never-stale state machine (tests/never_stale_machine.py) on CI's budget:
RSNAP_MACHINE_EXAMPLES examples (default 10) of up to RSNAP_MACHINE_STEPS rules (default 6).
bench/bench_never_stale.py runs it for minutes."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from cargo_util import create_workspace
from never_stale_machine import STATS, NeverStale, make_scene

EXAMPLES = int(os.environ.get("RSNAP_MACHINE_EXAMPLES", "10"))
STEPS = int(os.environ.get("RSNAP_MACHINE_STEPS", "6"))


@pytest.fixture(scope="module")
def scene(registry, gitdep_url, tmp_path_factory):
    return make_scene(create_workspace(tmp_path_factory.mktemp("machine") / "ws", registry.index_url, gitdep_url))


def test_never_stale_state_machine(scene, request):
    NeverStale.scene = scene
    STATS.clear()
    run_state_machine_as_test(NeverStale, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
        derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck)))
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    line = "[rsnap never-stale machine] " + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(line)
    assert STATS["steps"] >= EXAMPLES and STATS["stale_builds"] == 0
