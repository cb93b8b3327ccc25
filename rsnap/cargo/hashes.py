"""cargo's own hashes, recomputed: the `rustc` value in fingerprints and git db dir names.

cargo hashes with rustc-stable-hash's SipHasher128 (SipHash-1-3, 128-bit output, keys 0);
a string is hashed with a 0xFF terminator and folded to a u64 as `lo * 3 + hi`.
"""
from __future__ import annotations

import struct

_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _sip_round(v0, v1, v2, v3):
    v0 = (v0 + v1) & _M64; v2 = (v2 + v3) & _M64
    v1 = _rotl(v1, 13) ^ v0; v3 = _rotl(v3, 16) ^ v2; v0 = _rotl(v0, 32)
    v2 = (v2 + v1) & _M64; v0 = (v0 + v3) & _M64
    v1 = _rotl(v1, 17) ^ v2; v3 = _rotl(v3, 21) ^ v0; v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def sip128(data: bytes) -> tuple[int, int]:
    """SipHash-1-3 with 128-bit output, keys (0, 0): rustc-stable-hash's SipHasher128."""
    v0, v1 = 0x736F6D6570736575, 0x646F72616E646F6D ^ 0xEE
    v2, v3 = 0x6C7967656E657261, 0x7465646279746573
    n = len(data) // 8
    for i in range(n):
        m = struct.unpack_from("<Q", data, 8 * i)[0]
        v3 ^= m
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
        v0 ^= m
    tail = (data[8 * n:] + b"\0" * 8)[:8]
    b = ((len(data) & 0xFF) << 56) | struct.unpack("<Q", tail)[0]
    v3 ^= b
    v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xEE
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    lo = v0 ^ v1 ^ v2 ^ v3
    v1 ^= 0xDD
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    return lo, v0 ^ v1 ^ v2 ^ v3


def cargo_hash_str(s: str) -> int:
    """cargo's `util::hash_u64(&String)` (cargo >= 1.85: StableHasher, str hashed with a 0xFF terminator)."""
    lo, hi = sip128(s.encode() + b"\xff")
    return (lo * 3 + hi) & _M64


def cargo_short_hash_str(s: str) -> str:
    """cargo's `short_hash` of a string-hashed value: the u64 as little-endian hex."""
    return struct.pack("<Q", cargo_hash_str(s)).hex()
