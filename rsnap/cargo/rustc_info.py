"""Cargo's cache of rustc queries (`<build-dir>/.rustc_info.json`), carried in the manifest.

Without it, the first `cargo build` after a restore into an empty target dir runs `rustc -vV` and
`rustc - --print=file-names,sysroot,cfg,...` again (through the rustup proxy): measured here
~90 ms on every such build (no-op build 0.13 s with the file, 0.22 s without). The file is not a
snapshot entry (older rsnap refuses that name in a manifest), so its text travels in the optional
manifest field `rustc_info` ({root name: {file name: text}}; older rsnap ignores it) and restore
writes it only where the root has none. Cargo validates it itself: the file holds a fingerprint
of the rustc binary (path, mtime, rustup toolchain env) and is ignored and rewritten when that
differs, so a copy from another machine never makes cargo use wrong answers.
"""
from __future__ import annotations

import os
from pathlib import Path

NAMES = (".rustc_info.json", ".rustc-info.json")
MAX_BYTES = 1 << 20
ROOTS = ("target", "build")


def collect(roots: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{root name: {file name: text}} of the files present at the top of the target/build roots."""
    out: dict[str, dict[str, str]] = {}
    for name, path in roots.items():
        if name not in ROOTS:
            continue
        for fname in NAMES:
            try:
                with open(os.path.join(path, fname), "rb") as f:
                    raw = f.read(MAX_BYTES + 1)
                if len(raw) <= MAX_BYTES:
                    out.setdefault(name, {})[fname] = raw.decode()
            except (OSError, UnicodeDecodeError):
                continue
    return out


def valid(doc) -> dict[str, dict[str, str]]:
    """The manifest field, checked (hostile input): root names, file names and sizes."""
    if not isinstance(doc, dict):
        raise ValueError("rustc_info must be an object")
    for name, files in doc.items():
        if name not in ROOTS or not isinstance(files, dict):
            raise ValueError(f"bad rustc_info root {name!r}")
        for fname, text in files.items():
            if fname not in NAMES or not isinstance(text, str) or len(text) > MAX_BYTES:
                raise ValueError(f"bad rustc_info entry {fname!r}")
    return doc


def put_back(roots: dict[str, Path], info: dict[str, dict[str, str]]) -> int:
    """Write each recorded file where its root has none (temp file + rename); the number written.
    An existing file is left alone: it is this machine's own, and cargo keeps it current."""
    written = 0
    for name, files in (info or {}).items():
        path = roots.get(name)
        if path is None or not os.path.isdir(path):
            continue
        for fname, text in files.items():
            dest = os.path.join(path, fname)
            if os.path.lexists(dest):
                continue
            tmp = os.path.join(path, f".{fname}.rsnap-tmp")
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, dest)
                written += 1
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    return written
