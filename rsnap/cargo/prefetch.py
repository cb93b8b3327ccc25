"""Start the subprocesses a restore or save needs before the rest of rsnap is imported.

`cargo metadata` and `rustc -vV` take 20-60 ms each; started first, they run while Python
imports rsnap's modules (another ~50 ms) instead of after. `run` hands out a started
process's result, or runs the command then and there.
"""
from __future__ import annotations

import os

_started: dict = {}  # (cmd, cwd) -> subprocess.Popen (subprocess is imported when a command runs)
_cached: dict[tuple, str] = {}   # (cmd, cwd) -> stdout, from rsnap.cargo.discovery_cache
_results: list[list] = []        # [cmd, cwd, stdout] of this process's successful discovery commands
_ran = [False]                   # did anything actually run (so the cache is worth rewriting)
_started_ns = [0]


def start(cmd: list[str], cwd: str | None = None) -> None:
    key = (tuple(cmd), cwd)
    if key in _started or key in _cached:
        return
    import subprocess  # not imported by a call whose discovery is cached (~5 ms)
    try:
        _started[key] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError:
        pass  # `run` tries again and reports


def run(cmd: list[str], cwd: str | None = None, timeout: float | None = None) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of cmd; raises OSError if it cannot be started and
    TimeoutError (after killing it) if it does not finish in time."""
    key = (tuple(cmd), cwd)
    if key in _cached:
        out = _cached.pop(key)
        _results.append([cmd, cwd, out])
        return 0, out, ""
    import subprocess
    start(cmd, cwd)
    proc = _started.pop(key, None)
    if proc is None:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"{cmd[0]} did not answer in {timeout} s") from None
    if proc.returncode == 0 and (cmd[-1:] == ["-vV"] or ("metadata" in cmd and "--no-deps" in cmd)):
        _results.append([cmd, cwd, out])
        _ran[0] = True
    return proc.returncode, out, err


def rustc_version_cmd() -> list[str]:
    return [os.environ.get("RUSTC") or "rustc", "-vV"]


def metadata_cmd(manifest_path: str | None, no_deps: bool) -> list[str]:
    cmd = ["cargo", "metadata", "--format-version", "1", "--no-deps" if no_deps else "--offline"]
    return cmd + (["--manifest-path", manifest_path] if manifest_path else [])


def likely_root(manifest_path: str | None) -> str:
    """Where the workspace probably is (rustc -vV runs there: rustup reads toolchain files)."""
    return os.path.dirname(os.path.abspath(manifest_path)) if manifest_path else os.getcwd()


def start_discovery(manifest_path: str | None) -> None:
    """What every restore and save runs first: workspace metadata and the compiler version,
    unless rsnap.cargo.discovery_cache has their answers."""
    import time
    from . import discovery_cache
    _started_ns[0] = time.time_ns()
    for cmd, cwd, out in discovery_cache.lookup(manifest_path) or []:
        _cached[(tuple(cmd), cwd)] = out
    start(metadata_cmd(manifest_path, no_deps=True))
    start(rustc_version_cmd(), likely_root(manifest_path))


def from_cache() -> bool:
    """Did this call's discovery come from rsnap.cargo.discovery_cache (nothing spawned)?"""
    return bool(_results) and not _ran[0]


def remember(target_dir, manifest_path: str | None) -> None:
    """After a call: record what discovery ran, for the next call (rsnap.cargo.discovery_cache)."""
    if _ran[0] and _started_ns[0]:
        from . import discovery_cache
        discovery_cache.save(target_dir, manifest_path, _results, _started_ns[0])
