"""The stand-in cache service (tests/gha_server.py) is only worth what GitHub's own client and
OpenDAL's `ghac` make of it: both must save and restore through it, in JSON and protobuf."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gha_server import NODE_DIR, SERVICE

opendal = pytest.importorskip("opendal")


def actions_cache(server, cwd: Path, *args: str) -> str:
    """Run @actions/cache (tests/node/actions_cache.mjs); its `result=` line."""
    env = dict(os.environ, **server.env(), RUNNER_TEMP=str(cwd / "runner-temp"))
    proc = subprocess.run(["node", str(NODE_DIR / "actions_cache.mjs"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("result=")[-1].strip()


def test_github_cache_client_saves_and_restores_through_the_server(gha_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first")
    assert actions_cache(gha_server, tmp_path, "save", "deps-linux-1", "data") != "-1"
    (data / "a.txt").write_text("second")
    assert actions_cache(gha_server, tmp_path, "save", "deps-linux-2", "data") != "-1"
    (data / "a.txt").write_text("third")
    # an existing key is immutable: the client is refused and says so, nothing is stored
    assert actions_cache(gha_server, tmp_path, "save", "deps-linux-2", "data") == "-1"
    assert gha_server.keys() == ["deps-linux-1", "deps-linux-2"]
    assert gha_server.counts["json"] == 5 and gha_server.counts["protobuf"] == 0

    (data / "a.txt").unlink()
    assert actions_cache(gha_server, tmp_path, "restore", "deps-linux-1", "data") == "deps-linux-1"
    assert (data / "a.txt").read_text() == "first"
    # a restore key prefixes both entries: the newest wins
    assert actions_cache(gha_server, tmp_path, "restore", "deps-mac-9", "data", "deps-linux-") == "deps-linux-2"
    assert (data / "a.txt").read_text() == "second"
    gha_server.delete(lambda k: k == "deps-linux-2")
    assert actions_cache(gha_server, tmp_path, "restore", "deps-mac-9", "data", "deps-linux-") == "deps-linux-1"
    assert actions_cache(gha_server, tmp_path, "restore", "deps-mac-9", "data", "deps-win-") == ""


@pytest.fixture
def ghac(gha_store):
    """OpenDAL's ghac operator on the test server (env set by gha_store)."""
    return opendal.Operator("ghac", root="/ops", version="rsnap-test")


def test_opendal_ghac_write_read_stat_range_and_not_found(ghac, gha_server):
    body = bytes(range(256)) * 40
    ghac.write("packs/p1", body)
    assert bytes(ghac.read("packs/p1")) == body
    assert ghac.stat("packs/p1").content_length == len(body)
    assert bytes(ghac.read("packs/p1", offset=1000, size=300)) == body[1000:1300]
    with pytest.raises(opendal.exceptions.NotFound):
        ghac.read("packs/none")
    with pytest.raises(opendal.exceptions.NotFound):
        ghac.stat("packs/none")
    ghac.write("empty", b"")
    assert ghac.stat("empty").content_length == 0 and bytes(ghac.read("empty")) == b""
    # it speaks protobuf, and the version it sends is the sha256 of the one it was given
    assert gha_server.counts["protobuf"] > 0 and gha_server.counts["json"] == 0
    assert {e["version"] for e in gha_server.entries()} == {hashlib.sha256(b"rsnap-test").hexdigest()}
    assert gha_server.keys() == ["ops/packs/p1", "ops/empty"]


def test_opendal_ghac_second_write_already_exists_and_no_list(ghac, gha_server):
    ghac.write("snapshots/s", b"one")
    with pytest.raises(opendal.exceptions.AlreadyExists):
        ghac.write("snapshots/s", b"two")
    assert bytes(ghac.read("snapshots/s")) == b"one"
    with pytest.raises(opendal.exceptions.Unsupported):
        list(ghac.list("/"))


def twirp(server, method: str, body: dict, token: str | None = None):
    req = urllib.request.Request(f"{server.url}twirp/{SERVICE}/{method}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json",
                                  "Authorization": f"Bearer {token or server.token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_server_throttles_with_retry_after_and_checks_the_token(gha_server):
    gha_server.throttle(2, retry_after=7, methods={"CreateCacheEntry"})
    lookup = {"key": "k", "version": "v"}
    assert twirp(gha_server, "GetCacheEntryDownloadURL", lookup)[0] == 200
    for _ in range(2):
        status, headers, body = twirp(gha_server, "CreateCacheEntry", lookup)
        assert (status, headers["Retry-After"], body["code"]) == (429, "7", "resource_exhausted")
    assert twirp(gha_server, "CreateCacheEntry", lookup)[2]["ok"] is True
    assert twirp(gha_server, "CreateCacheEntry", lookup, token="stolen")[0] == 401
    # reserved but not finalized: invisible to lookups
    assert twirp(gha_server, "GetCacheEntryDownloadURL", lookup)[2] == {"ok": False}
