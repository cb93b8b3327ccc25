"""What rsnap knows about cargo: where things are, and which files in them matter.

Everything is discovered the way cargo discovers it (`cargo metadata`, env, config),
never assumed. Where units are inside a build dir (both of cargo's layouts): rsnap.cargo.target_layout.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import prefetch
from ..errors import RsnapError, EXIT_WORKSPACE

# Files cargo recreates or uses as locks; never saved, never restored, never deleted.
EXCLUDED_TARGET_NAMES = {".rustc_info.json", ".rustc-info.json", ".cargo-lock", ".cargo-build-lock",
                         ".cargo-artifact-lock"}
RSNAP_DIR = ".rsnap"  # rsnap's own state inside each root; never part of a snapshot

# Subtrees of $CARGO_HOME that a snapshot carries. registry/src is not: cargo re-extracts
# it from registry/cache and ignores mtimes under $CARGO_HOME (checked on cargo 1.95).
CARGO_HOME_TREES = ("registry/index", "registry/cache", "git/db", "git/checkouts")
CARGO_HOME_EXCLUDED_NAMES = {
    "credentials", "credentials.toml", ".package-cache", ".package-cache-mutate",
    ".global-cache", ".crates.toml", ".crates2.json",
}

class Workspace:
    """Where cargo keeps things for one workspace (a plain class: see rsnap.repository.manifest)."""

    def __init__(self, *, root: Path, target_dir: Path, build_dir: Path, cargo_home: Path, manifest_path: Path,
                 path_package_dirs: list[Path] | None = None, package_dirs_by_name: dict[str, Path] | None = None):
        self.root, self.target_dir, self.build_dir = root, target_dir, build_dir
        self.cargo_home, self.manifest_path = cargo_home, manifest_path
        self.path_package_dirs = path_package_dirs if path_package_dirs is not None else []
        self.package_dirs_by_name = package_dirs_by_name if package_dirs_by_name is not None else {}


def cargo_home() -> Path:
    env = os.environ.get("CARGO_HOME")
    if env:
        return Path(env).absolute()
    return Path.home() / ".cargo"


def run_cargo_metadata(manifest_path: str | None, no_deps: bool) -> dict:
    try:
        code, stdout, stderr = prefetch.run(prefetch.metadata_cmd(manifest_path, no_deps))
    except OSError:
        raise RsnapError("cargo was not found on PATH", EXIT_WORKSPACE) from None
    if code != 0:
        last = (stderr.strip().splitlines() or ["cargo metadata failed"])[-1]
        raise RsnapError(f"cannot read the cargo workspace: {last}", EXIT_WORKSPACE)
    return json.loads(stdout)


def discover(manifest_path: str | None = None, with_deps: bool = False) -> Workspace:
    """Find workspace root, target dir, build dir and CARGO_HOME as cargo does."""
    if manifest_path and not Path(manifest_path).is_file():
        raise RsnapError(f"manifest path {manifest_path} does not exist", EXIT_WORKSPACE)
    meta = run_cargo_metadata(manifest_path, no_deps=True)
    if with_deps and _has_outside_path_packages(Path(meta["workspace_root"]), meta["packages"]):
        try:
            meta = run_cargo_metadata(manifest_path, no_deps=False)
        except RsnapError:
            pass  # offline resolution failed: workspace members are enough
    root = Path(meta["workspace_root"])
    target = Path(meta["target_directory"])
    build = Path(meta.get("build_directory") or target)
    ws = Workspace(
        root=root, target_dir=target, build_dir=build, cargo_home=cargo_home(),
        manifest_path=Path(manifest_path).absolute() if manifest_path else root / "Cargo.toml",
    )
    for pkg in meta["packages"]:
        if pkg.get("source") is None:
            d = Path(pkg["manifest_path"]).parent
            ws.path_package_dirs.append(d)
            ws.package_dirs_by_name.setdefault(pkg["name"], d)
    return ws


def add_outside_path_packages(ws: Workspace) -> None:
    """Add the path packages outside the workspace (found by the slower, resolving `cargo
    metadata`) to `ws`, when Cargo.lock says there are any."""
    if not _has_outside_path_packages(ws.root, [{"name": n} for n in ws.package_dirs_by_name]):
        return
    try:
        meta = run_cargo_metadata(str(ws.manifest_path), no_deps=False)
    except RsnapError:
        return  # offline resolution failed: workspace members are enough
    for pkg in meta["packages"]:
        d = Path(pkg["manifest_path"]).parent
        if pkg.get("source") is None and d not in ws.path_package_dirs:
            ws.path_package_dirs.append(d)
            ws.package_dirs_by_name.setdefault(pkg["name"], d)


def _has_outside_path_packages(root: Path, members: list[dict]) -> bool:
    """Does Cargo.lock list a path package (no `source`) that is not a workspace member?
    Only then is the slower, resolving `cargo metadata` needed to find its directory.
    Without a readable Cargo.lock, assume it does."""
    try:
        text = (root / "Cargo.lock").read_text()
    except (OSError, UnicodeDecodeError):
        return True
    names = {p["name"] for p in members}
    for block in text.split("[[package]]")[1:]:
        name = re.search(r'^name = "([^"]+)"', block, re.M)
        if name is None or (not re.search(r"^source = ", block, re.M) and name.group(1) not in names):
            return True
    return False


# ---------------------------------------------------------------- target paths

def is_excluded_target_path(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] == RSNAP_DIR or parts[-1] in EXCLUDED_TARGET_NAMES


def is_cargo_home_excluded(rel: str) -> bool:
    return rel.split("/")[-1] in CARGO_HOME_EXCLUDED_NAMES or rel.split("/")[0] == RSNAP_DIR


# ---------------------------------------------------------------- dep-info & build outputs

_DEP_WORD = re.compile(r"(?:\\ |[^ ])+")


def parse_makefile_depinfo(text: str) -> list[str]:
    """Dependency paths of a rustc `.d` file (Makefile syntax, `\\ ` escapes spaces)."""
    paths: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        colon = line.find(": ")
        if colon < 0:
            continue  # "path:" lines (no dependencies) and anything else
        paths.update(w.replace("\\ ", " ") for w in _DEP_WORD.findall(line, colon + 2))
    return sorted(paths)


_RERUN = re.compile(r"^cargo::?rerun-if-changed=(.*)$")


def rerun_if_changed_paths(output_text: str) -> list[str]:
    return [m.group(1).strip() for line in output_text.splitlines() if (m := _RERUN.match(line.strip()))]
