"""Default snapshot key: a digest of everything that changes what cargo builds, and the CI job.

Key shape: <os>-<arch>-<toolchain8>-<paths8>-<job8>-<rest16>. The first four parts form the
"family" prefix: a partial restore only takes snapshots of the same platform,
toolchain, workspace path and CARGO_HOME (anything else would rebuild everything or,
for crates embedding CARGO_MANIFEST_DIR, be stale). The fifth is the CI job (RSNAP_JOB,
else GITHUB_JOB, else GitLab's CI_JOB_NAME; none outside CI): two jobs of one workflow
(`cargo build --release`, `cargo test`) build different units, and sharing one key, each
would restore the other's snapshot and its save's GC would drop the other's units.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import xxhash

from . import prefetch
from ..errors import RsnapError, EXIT_USAGE, EXIT_WORKSPACE

KEY_PATTERN = re.compile(r"^[A-Za-z0-9._+=-]{1,200}$")
KEY_FORMAT = "2"
# where the CI job's identity comes from, first set wins (RSNAP_JOB even when empty: "no job")
JOB_ENV = ("RSNAP_JOB", "GITHUB_JOB", "CI_JOB_NAME")

_ENV_PREFIXES = ("CARGO_", "RUST", "CC", "CFLAGS", "CXX", "CMAKE", "LDFLAGS", "AR")
_ENV_IGNORED = re.compile(
    r"^(CARGO_HOME|CARGO_TARGET_DIR|CARGO_BUILD_TARGET_DIR|CARGO_BUILD_BUILD_DIR|CARGO_TERM_.*|CARGO_HTTP_.*|CARGO_NET_.*"
    r"|CARGO_REGISTRIES_.*|CARGO_REGISTRY_.*|CARGO_MAKEFLAGS|CARGO_BUILD_JOBS|CARGO_CACHE_.*|CARGO_LOG.*"
    r"|RUSTC_WRAPPER|RUSTC_WORKSPACE_WRAPPER|RUSTUP_HOME|RUSTUP_.*|RUST_LOG|RUST_BACKTRACE|RUST_TEST_.*|RUST_MIN_STACK"
    r"|RUST_RECURSION_COUNT|RSNAP_.*)$")


def validate_key(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise RsnapError(f"invalid key {key!r}: use letters, digits and . _ + = - (at most 200)", EXIT_USAGE)
    return key


def _h(data: bytes | str, n: int) -> str:
    if isinstance(data, str):
        data = data.encode()
    return xxhash.xxh3_128_hexdigest(data)[:n]


@functools.lru_cache(maxsize=None)
def rustc_version(cwd: str | None = None) -> str:
    """`rustc -vV` as cargo would run it (honours RUSTC and rustup overrides in `cwd`)."""
    cmd = prefetch.rustc_version_cmd()
    try:
        code, stdout, stderr = prefetch.run(cmd, cwd, timeout=120)
    except TimeoutError:
        raise RsnapError(f"{cmd[0]} -vV did not answer in 120 s", EXIT_WORKSPACE) from None
    except OSError:
        raise RsnapError(f"{cmd[0]} was not found on PATH", EXIT_WORKSPACE) from None
    if code != 0:
        raise RsnapError(f"{cmd[0]} -vV failed: {stderr.strip()[:200]}", EXIT_WORKSPACE)
    return stdout


def _file_digest(path: Path) -> str | None:
    try:
        return _h(path.read_bytes(), 16)
    except OSError:
        return None


def _config_files(ws) -> dict[str, str]:
    """Cargo config files cargo would read: from the workspace up to /, then CARGO_HOME."""
    found: dict[str, str] = {}
    for d in [ws.root, *ws.root.parents]:
        for name in ("config.toml", "config"):
            digest = _file_digest(d / ".cargo" / name)
            if digest:
                found[str(d / ".cargo" / name)] = digest
    for name in ("config.toml", "config"):
        digest = _file_digest(ws.cargo_home / name)
        if digest:
            found[str(ws.cargo_home / name)] = digest
    return found


def build_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(_ENV_PREFIXES) and not _ENV_IGNORED.match(k)}


def job_identity(env=os.environ) -> str:
    """The CI job this run belongs to, "" when there is none."""
    for name in JOB_ENV:
        if name in env and (env[name] or name == "RSNAP_JOB"):
            return env[name]
    return ""


def key_inputs(ws) -> dict:
    rustc = rustc_version(str(ws.root))
    host = next((l.split(":", 1)[1].strip() for l in rustc.splitlines() if l.startswith("host:")), "unknown")
    inputs = {
        "key_format": KEY_FORMAT,
        "os": os.uname().sysname.lower(),      # what platform.system()/machine() return on POSIX,
        "arch": os.uname().machine.lower(),    # without importing platform (~5 ms per call)
        "rustc": rustc.strip(),
        "host": host,
        "target": os.environ.get("CARGO_BUILD_TARGET", host),
        "workspace_root": str(ws.root),
        "cargo_home": str(ws.cargo_home),
        "cargo_lock": _file_digest(ws.root / "Cargo.lock"),
        "rust_toolchain": {n: _file_digest(ws.root / n) for n in ("rust-toolchain", "rust-toolchain.toml")
                           if (ws.root / n).exists()},
        "cargo_config": _config_files(ws),
        "env": build_env(),
        "job": job_identity(),
    }
    return inputs


def family_prefix(inputs: dict) -> str:
    toolchain = _h(inputs["rustc"] + inputs["target"], 8)
    paths = _h(inputs["workspace_root"] + "\0" + inputs["cargo_home"], 8)
    return f"{inputs['os']}-{inputs['arch']}-{toolchain}-{paths}-"


def job_prefix(inputs: dict) -> str:
    """The family prefix plus this job's part: the same job's snapshots of other inputs."""
    job = inputs.get("job", "").encode("utf-8", "surrogateescape")   # env bytes that are not UTF-8
    return family_prefix(inputs) + _h(job, 8) + "-"


def fallback_prefixes(inputs: dict, restore_keys: list[str] = ()) -> list[str]:
    """Where an exact miss looks next, in order: this job's older snapshots, the --restore-key
    prefixes, then any job's snapshot of the same family."""
    return [job_prefix(inputs), *restore_keys, family_prefix(inputs)]


def default_key(inputs: dict) -> str:
    rest = {k: v for k, v in inputs.items()
            if k not in ("os", "arch", "rustc", "workspace_root", "cargo_home", "job")}
    return job_prefix(inputs) + _h(repr(sorted(rest.items())), 16)
