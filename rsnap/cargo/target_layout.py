"""Cargo's build-dir layouts: the one module that knows where a unit's files are.

Paths are relative to the build dir (`build.build-dir`, the target dir unless set); a *profile
dir* is `[<triple>/]<profile>` below it. Two layouts exist, told apart on disk per unit (one
build dir may hold both, e.g. after a cargo upgrade):

legacy (cargo up to 1.99)::

    <profile>/.fingerprint/<pkg>-<H>/      fingerprint files of unit H
    <profile>/deps/<name>-<H>[.ext]        rustc outputs (rlib, rmeta, so, bins, tests, .d)
    <profile>/build/<pkg>-<H>/             build script: compiled (build-script-build[-<H>],
                                           build_script_build-<H>.d) or run (output, out/, ...)
    <profile>/examples/<name>-<H>[.ext], <profile>/native/

new (stable in cargo 1.100; `-Zbuild-dir-new-layout` before, rust-lang/cargo#15010)::

    <profile>/build/<pkg>/<H>/fingerprint/  fingerprint files
    <profile>/build/<pkg>/<H>/out/          rustc outputs (libs keep `-<H>`, bins do not), or
                                            the OUT_DIR of a build-script run
    <profile>/build/<pkg>/<H>/run/          a build-script run: stdout (`output` in nightlies
                                            before 1.95), stderr, root-output, invoked.timestamp

Build-script binaries in the new layout: `out/build_script_build-<H>` + `.d` and a
`build-script-build` hard link up to cargo 1.95; `out/build_script_build[.d]` from 1.96
(rust-lang/cargo#16812, #16855). Both layouts: `<profile>/incremental/<crate>-<id>/`, and
uplifted artifacts (hard links of unit outputs) in the *target* dir's `<profile>/` and
`<profile>/examples/`. Checked on cargo 1.95 (both layouts); the 1.96+ names from cargo's
changelog and src/compiler/layout.rs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HEX16 = re.compile(r"^[0-9a-f]{16}$")
HASHED = re.compile(r"^(?P<name>.+)-(?P<hash>[0-9a-f]{16})$")    # <pkg>-<H>, <crate>-<H>
LEGACY, NEW = "legacy", "new"
LEGACY_FINGERPRINTS = ".fingerprint"
UNIT_DIRS = ("deps", "examples", "native")        # legacy dirs of files named <name>-<H>[.ext]
RUN_OUTPUTS = ("stdout", "output")                # new layout: a build-script run's output file
NEVER_PROFILE = {"doc", "package", "tmp", "incremental", "deps", "build", LEGACY_FINGERPRINTS, "examples",
                 "cargo-timings", ".metabuild"}


def split_hashed_name(name: str) -> tuple[str, str] | None:
    """'serde-0a1b2c3d4e5f6071' -> ('serde', '0a1b2c3d4e5f6071')."""
    m = HASHED.match(name)
    return (m.group("name"), m.group("hash")) if m else None


def is_unit_hash(name: str) -> bool:
    return bool(HEX16.match(name))


def hashed_file(name: str) -> tuple[str, str] | None:
    """(name, H) of an output file `<name>-<H>[.ext]` (legacy deps/, examples/, native/)."""
    return split_hashed_name(name.split(".", 1)[0])


# ---------------------------------------------------------------- relative paths

def fingerprint_dir_of(rel: str) -> tuple[str, str, str, str] | None:
    """For a file directly in a unit's fingerprint dir: (fingerprint dir, package, unit hash,
    profile dir), both layouts."""
    parts = rel.split("/")
    if len(parts) >= 3 and parts[-3] == LEGACY_FINGERPRINTS:
        named = split_hashed_name(parts[-2])
        if named:
            return "/".join(parts[:-1]), named[0], named[1], "/".join(parts[:-3])
    if len(parts) >= 5 and parts[-2] == "fingerprint" and parts[-5] == "build" and HEX16.match(parts[-3]):
        return "/".join(parts[:-1]), parts[-4], parts[-3], "/".join(parts[:-5])
    return None


def is_fingerprint_path(rel: str) -> bool:
    """Files cargo reads to decide freshness (anywhere in a fingerprint dir). Restore writes them last."""
    parts = rel.split("/")
    if LEGACY_FINGERPRINTS in parts[:-1]:
        return True
    return any(p == "fingerprint" and i >= 3 and parts[i - 3] == "build" and HEX16.match(parts[i - 1])
               for i, p in enumerate(parts[:-1]))


def unit_of(rel: str, profile: str) -> str | None:
    """The unit hash owning `rel` (a path below profile dir `profile`, "" for the root), or None:
    its fingerprint dir, legacy `build/<pkg>-<H>/` and `deps|examples|native/<name>-<H>[.ext]`,
    new `build/<pkg>/<H>/`."""
    if profile:
        if not rel.startswith(profile + "/"):
            return None
        rel = rel[len(profile) + 1:]
    parts = rel.split("/")
    if len(parts) < 2:
        return None
    top, name = parts[0], parts[1]
    if top == "build" and len(parts) > 2 and HEX16.match(parts[2]):
        return parts[2]
    if top in (LEGACY_FINGERPRINTS, "build"):
        named = split_hashed_name(name)
        return named[1] if named else None
    if top in UNIT_DIRS:
        named = hashed_file(name)
        return named[1] if named else None
    return None


def incremental_dir_of(rel: str, profile: str) -> tuple[str, str] | None:
    """(crate dir, crate name) of a path in `<profile>/incremental/<crate>-<id>/`."""
    below = rel[len(profile) + 1:] if profile else rel
    if profile and not rel.startswith(profile + "/"):
        return None
    parts = below.split("/")
    if len(parts) >= 2 and parts[0] == "incremental" and "-" in parts[1]:
        return (f"{profile}/incremental/{parts[1]}" if profile else f"incremental/{parts[1]}"), parts[1].rsplit("-", 1)[0]
    return None


def is_makefile_depinfo(rel: str) -> bool:
    """rustc's makefile dep-info of a unit (not an uplifted one): legacy deps/ or build/, new out/."""
    return rel.endswith(".d") and ("/deps/" in f"/{rel}" or "/build/" in f"/{rel}")


def makefile_depinfo_candidates(profile: str, package: str, unit_hash: str, crate: str) -> list[str]:
    """Where rustc's makefile dep-info of a unit may be, both layouts and cargo versions."""
    p = f"{profile}/" if profile else ""
    return [f"{p}deps/{crate}-{unit_hash}.d", f"{p}build/{package}-{unit_hash}/{crate}-{unit_hash}.d",
            f"{p}build/{package}/{unit_hash}/out/{crate}-{unit_hash}.d", f"{p}build/{package}/{unit_hash}/out/{crate}.d"]


def proc_macro_candidates(profile: str, package: str, unit_hash: str, crate: str) -> list[str]:
    """Where a proc-macro unit's shared object would be (cargo names its fingerprint like a lib's)."""
    p = f"{profile}/" if profile else ""
    return [f"{p}{d}/lib{crate}-{unit_hash}{ext}" for d in ("deps", f"build/{package}/{unit_hash}/out")
            for ext in (".so", ".dylib")]


def skip_when_looking_for_fingerprints(parent: str, name: str) -> bool:
    """Dirs of a build dir that never hold fingerprint files (walks prune them); below `build/`
    a dir is a package's, whatever its name."""
    return os.path.basename(parent) != "build" and name in ("incremental", "deps", "out", "run", "examples",
                                                              "native", ".rsnap")


# ---------------------------------------------------------------- on disk

def scandir(path) -> list:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def profile_dirs(root: Path, skip: frozenset = frozenset({".rsnap"})) -> list[Path]:
    """`<root>/<profile>` and `<root>/<triple>/<profile>` dirs holding cargo units (either layout)."""
    out = []
    for d1 in scandir(root):
        if not d1.is_dir(follow_symlinks=False) or d1.name in NEVER_PROFILE or d1.name in skip:
            continue
        if looks_like_profile(Path(d1.path)):
            out.append(Path(d1.path))
            continue
        for d2 in scandir(d1.path):
            if d2.is_dir(follow_symlinks=False) and d2.name not in NEVER_PROFILE and looks_like_profile(Path(d2.path)):
                out.append(Path(d2.path))
    return sorted(out)


def looks_like_profile(p: Path) -> bool:
    if (p / LEGACY_FINGERPRINTS).is_dir() or (p / "deps").is_dir() or (p / "incremental").is_dir():
        return True
    return next(unit_dirs(p, first_only=True), None) is not None


def unit_dirs(profile: Path, first_only: bool = False):
    """(layout, package, unit hash, fingerprint dir, unit dir or None) of every unit with a
    fingerprint dir in a profile dir: legacy `.fingerprint/<pkg>-<H>/` and new `build/<pkg>/<H>/`."""
    for de in scandir(profile / LEGACY_FINGERPRINTS):
        named = split_hashed_name(de.name)
        if named and de.is_dir(follow_symlinks=False):
            yield LEGACY, named[0], named[1], Path(de.path), None
            if first_only:
                return
    for pkg in scandir(profile / "build"):
        if not pkg.is_dir(follow_symlinks=False) or HASHED.match(pkg.name):
            continue
        for h in scandir(pkg.path):
            if HEX16.match(h.name) and os.path.isdir(os.path.join(h.path, "fingerprint")):
                yield NEW, pkg.name, h.name, Path(h.path) / "fingerprint", Path(h.path)
                if first_only:
                    return


def layouts_on_disk(root: Path) -> set[str]:
    """Which layouts the build dir `root` holds units of (both after a cargo upgrade)."""
    return {layout for profile in profile_dirs(root) for layout, *_ in unit_dirs(profile)}


def build_script_outputs(root: Path):
    """(package, output file) of every build-script run below a build dir, both layouts."""
    for profile in profile_dirs(root):
        for de in scandir(profile / "build"):
            if not de.is_dir(follow_symlinks=False):
                continue
            named = split_hashed_name(de.name)
            if named:                                            # legacy build/<pkg>-<H>/output
                if os.path.isfile(os.path.join(de.path, "output")):
                    yield named[0], Path(de.path) / "output"
                continue
            for h in scandir(de.path):                           # new build/<pkg>/<H>/run/stdout
                for name in RUN_OUTPUTS:
                    p = os.path.join(h.path, "run", name)
                    if HEX16.match(h.name) and os.path.isfile(p):
                        yield de.name, Path(p)
                        break


def depinfo_files(root: Path):
    """rustc's makefile `.d` files anywhere under a target/build dir (incremental dirs aside)."""
    for dirpath, dirs, files in os.walk(root):
        if os.path.basename(dirpath) != "build":  # below build/: package dirs, whatever their names
            dirs[:] = [d for d in dirs if d not in ("incremental", ".rsnap", LEGACY_FINGERPRINTS)]
        for fn in files:
            if fn.endswith(".d"):
                yield Path(dirpath) / fn


def output_inodes(profile: Path) -> dict:
    """(dev, ino) -> unit hash of every unit output file of a profile dir (both layouts)."""
    idx = {}
    for sub in UNIT_DIRS:
        for de in scandir(profile / sub):
            named = hashed_file(de.name)
            if named and de.is_file(follow_symlinks=False):
                st = de.stat(follow_symlinks=False)
                idx[(st.st_dev, st.st_ino)] = named[1]
    for _layout, _pkg, unit_hash, _fp, unit_dir in unit_dirs(profile):
        for de in scandir(unit_dir / "out") if unit_dir else ():
            if de.is_file(follow_symlinks=False):
                st = de.stat(follow_symlinks=False)
                idx[(st.st_dev, st.st_ino)] = unit_hash
    return idx


def unit_of_path(path: Path, roots: list[Path]) -> tuple[str, str] | None:
    """(profile dir, unit hash) of an absolute path a unit owns below one of `roots`, or None
    (uplifted or unknown paths)."""
    path = Path(path)
    for root in roots:
        if not path.is_relative_to(root):
            continue
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        for i in range(min(len(parts) - 1, 3)):     # [<triple>/]<profile>/...
            profile = "/".join(parts[:i])
            if i and parts[i] in ("build", LEGACY_FINGERPRINTS, *UNIT_DIRS):
                h = unit_of(rel, profile)
                if h is not None:
                    return str(root / profile), h
    return None
