"""Big files are stored as content-defined chunks (rsnap.repository.chunking): a small edit stores only the
chunks around it, and restore reassembles the exact bytes or fails loudly."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rsnap.snapshot import save as snapshot
from rsnap.repository import chunking, repo
from rsnap.errors import StoreError
from rsnap.store import LocalStore

MiB = 1 << 20


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def save_file(store, data: bytes, known=None, known_chunks=None):
    """Store `data` the way a save stores a big file; returns (chunk list, new compressed bytes)."""
    seen = snapshot._Seen(dict(known or {}), dict(known_chunks or {}), {}, {})
    writer = repo.PackWriter(store)
    digest = repo.digest_bytes(data)
    stats = snapshot.SaveStats()
    snapshot._add_chunked(digest, snapshot._chunk(data, seen, snapshot._Claims()), seen, writer, stats)
    writer.flush()
    blobs = {d: (loc if loc is not None else writer.locations[d]) for d, loc in seen.blobs.items()}
    return digest, seen.chunks[digest], blobs, writer.bytes_written


def restore_file(store, blobs, chunks, digest, size) -> bytes:
    fd = os.memfd_create("rsnap-test")
    try:
        repo.write_chunks(store, blobs, chunks, fd, digest, size)
        return os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)


def edit(data: bytes, at: float, op: str, n: int, seed: int) -> bytes:
    pos = int(at * len(data))
    if op == "insert":
        return data[:pos] + random_bytes(seed, n) + data[pos:]
    if op == "delete":
        return data[:pos] + data[pos + n:]
    return data[:pos] + random_bytes(seed, n) + data[pos + n:]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), size=st.integers(chunking.CHUNK_FROM, 6 * MiB),
       edits=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["insert", "delete", "replace"]),
                                st.integers(1, 5000)), min_size=1, max_size=3))
def test_edited_big_file_round_trips_and_stores_little(tmp_path_factory, seed, size, edits):
    store = LocalStore(tmp_path_factory.mktemp("chunks"))
    old = random_bytes(seed, size)
    digest, chunks, blobs, _ = save_file(store, old)
    assert restore_file(store, blobs, chunks, digest, len(old)) == old

    new = old
    for i, (at, op, n) in enumerate(edits):
        new = edit(new, at, op, n, seed + i + 1)
    digest2, chunks2, blobs2, written = save_file(store, new, known=blobs, known_chunks={digest: chunks})
    assert restore_file(store, blobs2, chunks2, digest2, len(new)) == new
    # each edit rewrites the chunk it falls in and at most the next (chunks are at most 1 MiB)
    max_chunk = 4 * chunking.AVG_CHUNK
    assert written <= len(edits) * (2 * max_chunk + 5000) + 4096, (written, len(new))


def test_small_edit_of_a_big_file_stores_a_small_fraction(tmp_path):
    store = LocalStore(tmp_path)
    old = random_bytes(1, 16 * MiB)
    digest, chunks, blobs, first = save_file(store, old)
    new = old[:8 * MiB] + b"one more line\n" + old[8 * MiB:]
    _d, _c, _b, written = save_file(store, new, known=blobs, known_chunks={digest: chunks})
    assert first >= 16 * MiB  # random bytes do not compress
    assert written < 0.1 * first, (written, first)


def test_corrupt_chunk_or_wrong_chunk_list_fails(tmp_path):
    store = LocalStore(tmp_path / "store")
    data = random_bytes(2, 3 * MiB)
    digest, chunks, blobs, _ = save_file(store, data)
    assert len(chunks) > 2
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    with pytest.raises(StoreError, match="does not match its digest"):
        restore_file(store, blobs, swapped, digest, len(data))
    pack = repo.pack_name(blobs[chunks[-1]][0])
    raw = bytearray(store.get(pack))
    _p, off, clen, _s = blobs[chunks[-1]]
    raw[off + clen // 2] ^= 0xFF
    store.put(pack, bytes(raw))  # same name, damaged bytes: as if the disk flipped a bit
    with pytest.raises(StoreError, match="corrupt"):
        restore_file(store, blobs, chunks, digest, len(data))


def test_a_big_file_rewritten_while_mapped_is_refused(tmp_path):
    """Big files are mapped, not copied: a rewrite by someone else during the save must not
    leave a snapshot whose bytes do not match their digest."""
    path = tmp_path / "big.bin"
    path.write_bytes(random_bytes(3, 2 * MiB))
    data, digest = snapshot.scan.read_and_hash(path)
    assert not isinstance(data, bytes)  # mapped
    snapshot._check_unchanged(data, digest, "big.bin")
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"rewritten")
    with pytest.raises(snapshot.RsnapError, match="changed while it was being saved"):
        snapshot._check_unchanged(data, digest, "big.bin")


def test_a_file_of_repeated_chunks_is_stored_once_and_restored_whole(tmp_path):
    """Zero-filled regions cut into identical chunks: one blob, named several times in the list."""
    store = LocalStore(tmp_path)
    data = bytes(5 * MiB) + random_bytes(4, MiB) + bytes(3 * MiB)
    digest, chunks, blobs, written = save_file(store, data)
    assert len(chunks) > len(set(chunks))  # some chunk repeats
    assert written < MiB + 64 * 1024       # the random MiB, and the zero chunk once
    assert restore_file(store, blobs, chunks, digest, len(data)) == data
