"""pytest fixtures for the BuildKit and Earthly tests (a plugin listed in conftest.py)."""
from __future__ import annotations

import pytest

import buildkit_util as bk


@pytest.fixture(scope="session")
def buildkit_session():
    """A BuildKit daemon and the base images, once per pytest run; skips where none can start.
    A daemon started here is stopped at the end; one that was already running is left alone."""
    try:
        session = bk.setup()
    except bk.Unavailable as e:
        pytest.skip(f"no BuildKit: {e}")
    yield session
    bk.stop(session)


@pytest.fixture
def buildkit(buildkit_session):
    return buildkit_session
