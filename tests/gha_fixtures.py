"""pytest fixtures of the GitHub Actions cache tests (a plugin: conftest.py lists it in `pytest_plugins`).

azurite (session)   Azurite's blob service on loopback (tests/gha_server.py), skipped without node
                    or tests/node/node_modules (`npm ci --prefix tests/node`)
gha_server          a fresh cache service (its own container, entries and counters) in front of it
gha_store           (url, env) of an rsnap gha store on gha_server: the environment a runner gives
                    JavaScript actions; a conformance suite can take this fixture as it is
"""
from __future__ import annotations

import pytest

from gha_server import Azurite, CacheServer, node_missing


@pytest.fixture(scope="session")
def azurite():
    reason = node_missing()
    if reason:
        pytest.skip(reason)
    server = Azurite.start()
    yield server
    server.stop()


@pytest.fixture
def gha_server(azurite):
    server = CacheServer(azurite)
    yield server
    server.stop()


@pytest.fixture
def gha_store(gha_server, monkeypatch):
    """An empty gha:// store; its env is also set in this process (for in-process stores)."""
    env = gha_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield "gha://rsnap-test", env
