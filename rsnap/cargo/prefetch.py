"""Start the subprocesses a restore or save needs before the rest of rsnap is imported.

`cargo metadata` and `rustc -vV` take 20-60 ms each; started first, they run while Python
imports rsnap's modules (another ~50 ms) instead of after. `run` hands out a started
process's result, or runs the command then and there.
"""
from __future__ import annotations

import os
import subprocess

_started: dict[tuple, subprocess.Popen] = {}


def start(cmd: list[str], cwd: str | None = None) -> None:
    key = (tuple(cmd), cwd)
    if key in _started:
        return
    try:
        _started[key] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError:
        pass  # `run` tries again and reports


def run(cmd: list[str], cwd: str | None = None, timeout: float | None = None) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of cmd; raises OSError if it cannot be started and
    subprocess.TimeoutExpired (after killing it) if it does not finish in time."""
    start(cmd, cwd)
    proc = _started.pop((tuple(cmd), cwd), None)
    if proc is None:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
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
    """What every restore and save runs first: workspace metadata and the compiler version."""
    start(metadata_cmd(manifest_path, no_deps=True))
    start(rustc_version_cmd(), likely_root(manifest_path))
