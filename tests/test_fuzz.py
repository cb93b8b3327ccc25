"""Fuzzing the readers of untrusted store data: `manifest.loads` and `repo.read_blob`.

Whatever the bytes, only FormatError/StoreError (RsnapError) may come out, and whatever is
accepted satisfies the invariants restore relies on. Bounded for CI; raise
RSNAP_FUZZ_EXAMPLES for longer local runs (CI: 1000 per test, ~15 s in all).
"""
from __future__ import annotations

import json
import os
import posixpath

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from rsnap.repository import manifest as mf
from rsnap.repository import repo
from rsnap.errors import RsnapError
from rsnap.store import LocalStore

EXAMPLES = int(os.environ.get("RSNAP_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
ZC = zstandard.ZstdCompressor()

# ---------------------------------------------------------------- a valid manifest to mutate

BLOB_A, BLOB_B = "a" * 32, "b" * 32
PACK = "c" * 32
CHUNKED = "e" * 32  # a file stored as the chunks BLOB_B, BLOB_A, BLOB_B


def valid_doc() -> dict:
    return {
        "format": 2, "rsnap_version": "0.1.0", "key": "linux-x86_64-k", "created_ns": 1,
        "workspace_root": "/ws", "cargo_home": "/home/.cargo", "key_inputs": {"Cargo.lock": "x"},
        "roots": [
            {"name": "target", "path": "/ws/target", "merge": False, "entries": [
                ["debug", "d", 0o755, 0, 5, ""],
                ["debug/app", "f", 0o755, 10, 6, BLOB_A],
                ["debug/.fingerprint", "d", 0o755, 0, 5, ""],
                ["debug/.fingerprint/app-0123456789abcdef/bin-app", "f", 0o644, 16, 7, BLOB_B],
                ["debug/link", "l", 0o777, 0, 7, "app"],
                ["debug/big", "f", 0o644, 42, 7, CHUNKED],
            ]},
            {"name": "cargo_home", "path": "/home/.cargo", "merge": True, "entries": [
                ["registry/index/x", "d", 0o755, 0, 5, ""],
                ["registry/cache/x/foo-1.0.0.crate", "f", 0o644, 10, 6, BLOB_A],
            ]},
        ],
        "sources": [["crates/app/src/main.rs", "f", 3, 4, BLOB_A], [".", "d", 0, 4, BLOB_B],
                    ["/usr/include/zlib.h", "f", 3, 4, BLOB_A]],
        "source_dirs": [".", "/elsewhere/pkg"],
        "source_links": [["crates/app/src/shared.rs", "impl1.rs", "crates/app/src/impl1.rs"]],
        "blobs": {BLOB_A: [PACK, 0, 20, 10], BLOB_B: [PACK, 20, 20, 16]},
        "chunks": {CHUNKED: [BLOB_B, BLOB_A, BLOB_B]},
    }


def encode(doc) -> bytes:
    return ZC.compress(json.dumps(doc).encode())


def test_the_valid_manifest_loads():
    m = mf.loads(encode(valid_doc()))
    assert m.file_count() == 4 and m.root("cargo_home").merge
    assert m.chunks == {CHUNKED: [BLOB_B, BLOB_A, BLOB_B]}


def test_a_format_1_manifest_still_loads():
    """Written by rsnap before chunking: no `chunks`, every file one blob."""
    doc = valid_doc()
    del doc["chunks"]
    doc["format"] = 1
    doc["roots"][0]["entries"].pop()
    m = mf.loads(encode(doc))
    assert m.format == 1 and m.chunks == {} and m.file_count() == 3


@pytest.mark.parametrize("chunks, why", [
    ({CHUNKED: [BLOB_A, "f" * 32]}, "chunk of"),          # a chunk without a blob
    ({CHUNKED: []}, "bad chunk list"),
    ({CHUNKED: [BLOB_A, BLOB_A]}, "size mismatch"),        # 20 bytes, the entry says 42
    ({CHUNKED: [CHUNKED]}, "chunk of"),                    # chunks are blobs, never chunked files
    ({}, "no blob"),
    ([], "chunks must be an object"),
])
def test_bad_chunk_tables_are_rejected(chunks, why):
    doc = valid_doc()
    doc["chunks"] = chunks
    with pytest.raises(RsnapError, match=why):
        mf.loads(encode(doc))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30)
PATHS = st.sampled_from(["", ".", "..", "/", "a/../b", "../x", "/etc/passwd", "a//b", "a/./b", "a/", "x\x00y",
                         "a\\b", ".rsnap/state", "debug/.cargo-lock", "debug/app/x", "debug/link/x", "bin/cargo",
                         "config.toml", "registry/index/../../x", "registry/cache/x/y", "debug/new"]) | st.text(max_size=12)


def _check_invariants(m: mf.Manifest) -> None:
    """What restore relies on for anything loads() accepts."""
    assert m.format >= 1
    names = [r.name for r in m.roots]
    assert len(names) == len(set(names)) and set(names) <= {"target", "build", "cargo_home"}
    for r in m.roots:
        assert r.merge == (r.name == "cargo_home")
        paths = {e.path: e for e in r.entries}
        assert len(paths) == len(r.entries)
        for e in r.entries:
            assert e.path and not e.path.startswith("/") and posixpath.normpath(e.path) == e.path
            assert ".." not in e.path.split("/") and "\x00" not in e.path
            assert e.type in ("f", "d", "l", "h") and 0 <= e.mode <= 0o777
            parent = posixpath.dirname(e.path)
            while parent:
                assert parent not in paths or paths[parent].type == "d"
                parent = posixpath.dirname(parent)
            if e.type == "f" and e.digest in m.blobs:
                assert m.blobs[e.digest][3] == e.size
            elif e.type == "f":
                assert sum(m.blobs[c][3] for c in m.chunks[e.digest]) == e.size
            if e.type == "h":
                assert paths[e.digest].type == "f"
            if e.type == "l":
                target = posixpath.normpath(posixpath.join(posixpath.dirname(e.path), e.digest))
                assert not target.startswith("/") and target != ".." and not target.startswith("../")
            if r.name == "cargo_home":
                assert e.path.split("/")[0] in ("registry", "git")
    for s in m.sources:
        assert isinstance(s[3], int) and ".." not in s[0].split("/")
    for d in m.source_dirs:
        assert d != "/" and ".." not in d.split("/")
    for name, text, old_real in m.source_links:
        assert ".." not in name.split("/") and ".." not in old_real.split("/") and isinstance(text, str) and text


def _loads(data: bytes):
    try:
        m = mf.loads(data)
    except RsnapError:
        return None
    _check_invariants(m)
    return m


@FUZZ
@given(st.binary(max_size=300))
def test_loads_random_bytes(data):
    _loads(data)
    _loads(ZC.compress(data))


@FUZZ
@given(JSON)
def test_loads_random_json(doc):
    _loads(encode(doc))


def _set_path(doc, path, value):
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value


FIELDS = [("format",), ("created_ns",), ("roots",), ("blobs",), ("sources",), ("source_dirs",), ("key_inputs",),
          ("roots", 0), ("roots", 0, "name"), ("roots", 0, "merge"), ("roots", 0, "entries"),
          ("roots", 1, "merge"), ("roots", 1, "name"),
          *[("roots", 0, "entries", i, j) for i in range(6) for j in range(6)],
          *[("roots", 1, "entries", i, j) for i in range(2) for j in range(6)],
          ("blobs", BLOB_A), *[("blobs", BLOB_A, j) for j in range(4)],
          ("chunks",), ("chunks", CHUNKED), *[("chunks", CHUNKED, j) for j in range(3)],
          *[("sources", i, j) for i in range(3) for j in range(5)], ("source_dirs", 0), ("source_dirs", 1),
          ("source_links",), ("source_links", 0), *[("source_links", 0, j) for j in range(3)]]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSON | PATHS | st.integers(-1, 2**45)), min_size=1, max_size=4))
def test_loads_mutated_manifest(mutations):
    doc = valid_doc()
    for path, value in mutations:
        try:
            _set_path(doc, path, value)
        except (KeyError, IndexError, TypeError):
            pass
    _loads(encode(doc))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["target", "cargo_home"]), PATHS, st.sampled_from(["f", "d", "l", "h", "c", "p"]),
                          PATHS), min_size=1, max_size=5))
def test_loads_added_entries(added):
    """Extra entries with hostile paths, types and link targets."""
    doc = valid_doc()
    for root, path, typ, target in added:
        r = next(r for r in doc["roots"] if r["name"] == root)
        r["entries"].append([path, typ, 0o644, 10 if typ == "f" else 0, 1,
                             BLOB_A if typ == "f" else (target if typ in ("l", "h") else "")])
    _loads(encode(doc))


@FUZZ
@given(st.integers(0, 10**9), st.integers(1, 8))
def test_loads_bit_flipped_manifest(seed, flips):
    data = bytearray(encode(valid_doc()))
    for i in range(flips):
        pos = (seed * (i + 7919)) % (len(data) * 8)
        data[pos // 8] ^= 1 << (pos % 8)
    _loads(bytes(data))


def test_loads_pathological_inputs():
    cases = [b"", b"\x28\xb5\x2f\xfd", ZC.compress(b"[" * 200_000 + b"]" * 200_000),
             ZC.compress(b'{"format": 1e999}'), ZC.compress(b'{"format": 1, "created_ns": Infinity}'),
             ZC.compress(json.dumps({**valid_doc(), "created_ns": 1e300}).encode()),
             ZC.compress(json.dumps({**valid_doc(), "format": 99}).encode()),
             zstandard.ZstdCompressor(write_content_size=False).compress(b"{}" + b" " * 100_000)]
    for data in cases:
        with pytest.raises(RsnapError):
            mf.loads(data)


# ---------------------------------------------------------------- packs and blobs

@pytest.fixture(scope="module")
def pack_store(tmp_path_factory):
    """A store with one pack of three blobs; returns (store, pack id, {digest: (loc, data)})."""
    store = LocalStore(tmp_path_factory.mktemp("fuzzstore"))
    blobs = [b"", b"hello world" * 50, os.urandom(3000)]
    writer = repo.PackWriter(store)
    out = {}
    for data in blobs:
        d = repo.digest_bytes(data)
        writer.add(d, repo.compress(data), len(data))
    writer.flush()
    for data in blobs:
        d = repo.digest_bytes(data)
        out[d] = (writer.locations[d], data)
    pack_id = next(iter(writer.locations.values()))[0]
    return store, pack_id, out


def _read(store, loc, digest, cache=None):
    try:
        data = repo.read_blob(store, loc, digest, cache)
    except RsnapError:
        return None
    assert repo.digest_bytes(data) == digest and len(data) == loc[3]
    return data


def test_read_blob_reads_every_blob(pack_store):
    store, _pack, blobs = pack_store
    for digest, (loc, data) in blobs.items():
        assert repo.read_blob(store, loc, digest) == data


LOC_INT = st.integers(0, 1 << 40) | st.integers(0, 5000)


@FUZZ
@given(st.data())
def test_read_blob_hostile_locations(pack_store, data):
    """Offsets, lengths and sizes anywhere in what manifest validation allows (0..1 TiB)."""
    store, pack_id, blobs = pack_store
    digest = data.draw(st.sampled_from(sorted(blobs)))
    loc = [pack_id, data.draw(LOC_INT), data.draw(LOC_INT), data.draw(LOC_INT)]
    _read(store, loc, digest)
    raw = store.get(repo.pack_name(pack_id))
    _read(store, loc, digest, {pack_id: raw})


@FUZZ
@given(st.data())
def test_read_blob_damaged_pack(pack_store, tmp_path_factory, data):
    """Truncated, bit-flipped, extended or replaced pack bytes under the original locations."""
    store0, pack_id, blobs = pack_store
    raw = bytearray(store0.get(repo.pack_name(pack_id)))
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "replace", "zstd-bomb"]))
    if how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=8)):
            raw[pos // 8] ^= 1 << (pos % 8)
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw += data.draw(st.binary(max_size=64))
    elif how == "replace":
        raw = bytearray(data.draw(st.binary(max_size=len(raw) + 10)))
    else:  # frames that claim a huge content size, or none at all
        size = data.draw(st.sampled_from([1 << 40, 1 << 33, 0]))
        bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1000)
        raw = bytearray(bomb if size == 0 else ZC.compress(b"\0" * 1000)) + raw
    store = LocalStore(tmp_path_factory.mktemp("damaged"))
    store.put(repo.pack_name(pack_id), bytes(raw))
    digest = data.draw(st.sampled_from(sorted(blobs)))
    loc = list(blobs[digest][0])
    if how == "zstd-bomb":
        loc = [pack_id, 0, data.draw(st.integers(1, len(raw))), data.draw(st.sampled_from([1 << 40, 1 << 33, 1000]))]
    _read(store, loc, digest)
    _read(store, loc, digest, {pack_id: bytes(raw)})


def test_read_blob_missing_pack(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(RsnapError):
        repo.read_blob(store, ["d" * 32, 0, 10, 10], "e" * 32)
