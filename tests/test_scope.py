"""Issue 12 item 5: scopes. A run reads its own scope, then its fallbacks, and writes only its own."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cargo_util import create_workspace
from rsnap_util import rsnap, cold_runner
from rsnap.store.base import check_name
from rsnap.store.scope import encode_scope, read_scopes, scoped_url

CORE = "crates/core/src/lib.rs"


@given(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60))
def test_scope_names_map_to_distinct_valid_namespaces(a, b):
    ea, eb = encode_scope(a), encode_scope(b)
    check_name(f"scopes/{ea}/snapshots/k")
    assert (ea == eb) == (a == b)


def test_scoped_urls():
    assert scoped_url("s3://bucket/ci?region=eu-west-1", "feature/x") == \
        "s3://bucket/ci/scopes/feature=2Fx?region=eu-west-1"
    assert scoped_url("s3://bucket", "main") == "s3://bucket/scopes/main"
    assert scoped_url("/var/cache/rsnap", "main") == "/var/cache/rsnap/scopes/main"
    assert scoped_url("/var/cache/rsnap", None) == "/var/cache/rsnap"
    assert read_scopes("pr-7", ["main", "pr-7", "-"]) == ["pr-7", "main", None]


def tree_digest(top: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(top.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(top)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()



@pytest.fixture(scope="module")
def main_saved(registry, gitdep_url, tmp_path_factory):
    ws = create_workspace(tmp_path_factory.mktemp("scope") / "ws", registry.index_url, gitdep_url)
    ws.build("build")
    store = ws.root.parent / "store"
    assert rsnap(ws, store, "save", "--scope", "main", "--json").check().data["scope"] == "main"
    return ws, store


def test_branch_run_falls_back_to_main_and_writes_only_its_own_scope(main_saved):
    ws, store = main_saved
    before = tree_digest(store / "scopes" / "main")
    cold_runner(ws)
    data = rsnap(ws, store, "restore", "--scope", "feature/x", "--read-scope", "main", "--json").check().data
    assert (data["result"], data["scope"]) == ("exact", "main")
    assert ws.build("build", "--offline").all_fresh()
    ws.replace(CORE, "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 3;")
    ws.build("build", "--offline")
    saved = rsnap(ws, store, "save", "--scope", "feature/x", "--json").check().data
    assert "/scopes/feature=2Fx" in saved["store"]
    assert tree_digest(store / "scopes" / "main") == before
    assert not list((store).glob("snapshots/*")), "nothing may be written at the top level"
    # the branch's own snapshot is preferred over main's from now on
    cold_runner(ws)
    ws.replace(CORE, "pub const REVISION: u32 = 1;", "pub const REVISION: u32 = 3;")
    again = rsnap(ws, store, "restore", "--scope", "feature/x", "--read-scope", "main", "--json").check().data
    assert again["scope"] == "feature/x"


def test_poisoned_fork_scope_is_never_read_by_a_trusted_run(main_saved, tmp_path):
    ws, store = main_saved
    cold_runner(ws)
    rsnap(ws, store, "restore", "--scope", "fork-1", "--read-scope", "main", "--json").check()
    # the fork plants a wrong binary (its sources unchanged) and saves it under the same key
    ws.app_path.write_bytes(b"#!/bin/sh\necho poisoned\n")
    rsnap(ws, store, "save", "--scope", "fork-1", "--no-gc", "--json").check()
    cold_runner(ws)
    data = rsnap(ws, store, "restore", "--scope", "main", "--json").check().data
    assert data["scope"] == "main"
    ws.build("build", "--offline")
    assert "poisoned" not in ws.run_app()


def test_missing_fallback_scope_is_skipped(main_saved):
    ws, store = main_saved
    cold_runner(ws)
    data = rsnap(ws, store, "restore", "--scope", "new-branch", "--read-scope", "nope",
                 "--read-scope", "main", "--json").check().data
    assert data["scope"] == "main"
    data = rsnap(ws, store, "restore", "--scope", "lonely", "--json").check().data
    assert data["result"] == "miss"
