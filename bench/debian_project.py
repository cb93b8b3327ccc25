"""A real crate from Debian's ``librust-*-dev`` packages as a benchmark subject
(``bench_snapshot.py --debian-crate NAME``): a small real project, where rsnap's fixed
per-call costs weigh most.

The crate is copied from ``/usr/share/cargo/registry/NAME-VERSION`` into a git repository
(``<root>/origin``), its dev-only sections (``[dev-dependencies]``, ``[[test]]``, ``[[bench]]``,
``[[example]]``) dropped because Debian does not ship every dev-dependency, and locked
against the loopback registry of all Debian crates that ``realistic.py`` builds. Then it is
benchmarked like any ``--project``: ``cargo build`` of the library (and bins, if any).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import project
import realistic
from realistic import cargo_env, git, run

DEV_ONLY_SECTION = re.compile(r"\[\[?(dev-dependencies|target\..+\.dev-dependencies|test|bench|example)\b")


def find_crate(name: str) -> Path:
    """``NAME`` or ``NAME-VERSION`` among the Debian crates (the newest version for a bare name)."""
    dirs = realistic.debian_crate_dirs()
    exact = [d for d in dirs if d.name == name]
    named = sorted((d for d in dirs if d.name.rsplit("-", 1)[0] == name), key=lambda d: d.name)
    if exact or named:
        return (exact or named)[-1]
    raise SystemExit(f"--debian-crate {name}: not under {realistic.DEBIAN_REGISTRY} "
                     f"(have: {', '.join(d.name for d in dirs) or 'none'})")


def without_dev_sections(manifest: str) -> str:
    kept, skipping = [], False
    for line in manifest.splitlines():
        if line.startswith("["):
            skipping = bool(DEV_ONLY_SECTION.match(line))
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def make_origin(crate_dir: Path, origin: Path, env: dict[str, str]) -> None:
    shutil.rmtree(origin, ignore_errors=True)
    shutil.copytree(crate_dir, origin, ignore=shutil.ignore_patterns(*realistic.DROPPED_FROM_CRATES))
    manifest = origin / "Cargo.toml"
    manifest.write_text(without_dev_sections(manifest.read_text()))
    (origin / ".gitignore").write_text("/target\n")
    run(["cargo", "generate-lockfile"], cwd=origin, env=env)
    git("init", "-q", cwd=origin)
    git("add", "-A", "-f", ".", cwd=origin)
    git("commit", "-q", "-m", f"{crate_dir.name} from Debian, dev-only sections dropped", cwd=origin)


def setup(root: Path, name: str, edit_file: str | None, extra_env: dict[str, str]) -> project.Project:
    realistic.ensure_debian_crates()
    crate_dir = find_crate(name)
    server, cargo_home = realistic.serve_debian_registry(root)
    try:
        make_origin(crate_dir, root / "origin", cargo_env(cargo_home))
        bench = project.setup(root, root / "origin", cargo_home, edit_file, extra_env)
    except BaseException:
        server.stop()
        raise
    bench.server = server
    return bench
