"""RSNAP_TEST_REQUIRE=all (tests/conftest.py): a skip fails the run, and the run lists its skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.fixture
def machine_lacks():
    pytest.skip("no such daemon here")

def test_skips_in_body():
    pytest.skip("cannot mount here")

def test_skips_in_fixture(machine_lacks):
    pass

def test_runs():
    pass
'''


def _pytest(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("RSNAP_TEST_REQUIRE", None)
    if require:
        env["RSNAP_TEST_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_skips_pass_locally_and_are_listed_at_the_end(tmp_path):
    res = _pytest(tmp_path, None)
    assert res.returncode == 0, res.stdout
    assert "1 passed, 2 skipped" in res.stdout
    listed = res.stdout.split("rsnap: 2 skipped", 1)[1]
    assert "test_skips_in_body: Skipped: cannot mount here" in listed
    assert "test_skips_in_fixture: Skipped: no such daemon here" in listed


def test_require_all_turns_every_skip_into_a_failure(tmp_path):
    res = _pytest(tmp_path, "all")
    assert res.returncode == 1, res.stdout
    assert "1 failed, 1 passed, 1 error" in res.stdout
    assert res.stdout.count("RSNAP_TEST_REQUIRE=all: CI must not skip this test") >= 2
    assert "rsnap: 0 skipped" in res.stdout
