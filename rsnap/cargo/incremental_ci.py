"""Cargo >= 1.99 turns incremental compilation off when `CI` is set (rust-lang/cargo#17220).

Cargo's precedence: `CARGO_INCREMENTAL`, then `build.incremental` (`CARGO_BUILD_INCREMENTAL`),
then "not under CI", then `profile.*.incremental`: a profile setting does not keep it on in CI.
A job that restores a snapshot holding incremental dirs under such a cargo would silently build
without them (and its save's GC would drop them), so `rsnap restore` says once what to set.
"""
from __future__ import annotations

import re

OFF_UNDER_CI_FROM = (1, 99)   # the first cargo release that turns incremental off under CI
CI_VARS = ("CI", "TF_BUILD")  # what cargo itself checks (cargo-util's is_ci): set at all
ENV_SETTINGS = ("CARGO_INCREMENTAL", "CARGO_BUILD_INCREMENTAL")

_RELEASE = re.compile(r"^release:\s*(\d+)\.(\d+)", re.MULTILINE)
_VERSION = re.compile(r"^(?:cargo|rustc)\s+(\d+)\.(\d+)")

HINT = ("cargo {version} turns incremental compilation off when CI is set, so this job would not use "
        "the snapshot's incremental dirs; set CARGO_INCREMENTAL=1 for jobs that build the dev or test "
        "profile (or CARGO_INCREMENTAL=0 to drop them), see rsnap's README")


def release(version_text: str) -> tuple[int, int] | None:
    """(major, minor) from `rustc -vV` ("release: 1.99.0-nightly") or `cargo -V`/`rustc -V`."""
    m = _RELEASE.search(version_text) or _VERSION.match(version_text.strip())
    return (int(m[1]), int(m[2])) if m else None


def turns_off_under_ci(version_text: str) -> bool:
    found = release(version_text)
    return found is not None and found >= OFF_UNDER_CI_FROM


def under_ci(env) -> bool:
    return any(name in env for name in CI_VARS)


def explicit_setting(env, config_paths) -> str | None:
    """Where incremental is set in a way cargo lets win over CI: the env variable, or
    `build.incremental` in a cargo config file (path given); None if nowhere."""
    for name in ENV_SETTINGS:
        if name in env:
            return name
    import tomllib
    for path in config_paths:
        try:
            with open(path, "rb") as f:
                build = tomllib.load(f).get("build", {})
        except (OSError, ValueError):
            continue
        if isinstance(build, dict) and "incremental" in build:
            return f"build.incremental in {path}"
    return None


def has_incremental_dirs(m) -> bool:
    """Whether the snapshot's target or build root holds any `incremental/<crate>-<id>/`."""
    for root in m.roots:
        if root.name not in ("target", "build"):
            continue
        for e in root.entries:
            parts = e.path.split("/")
            if any(p == "incremental" and i + 1 < len(parts) for i, p in enumerate(parts)):
                return True
    return False


def hint(env, version_text: str, config_paths, snapshot_has_incremental) -> str | None:
    """The one line `rsnap restore` prints, or None. `snapshot_has_incremental`: a callable,
    asked (like the config files are read) only when the cheap checks say the hint is due."""
    if not (under_ci(env) and turns_off_under_ci(version_text)):
        return None
    if explicit_setting(env, config_paths) or not snapshot_has_incremental():
        return None
    major, minor = release(version_text)
    return HINT.format(version=f"{major}.{minor}")
