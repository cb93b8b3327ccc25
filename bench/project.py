"""Any Rust project in a git repository, as a benchmark subject (bench_snapshot.py --project).

The repository is cloned to ``<root>/ws`` (and re-cloned for every fresh-checkout step,
so sources get new mtimes as on a CI runner); cargo runs with ``CARGO_HOME`` from
``--cargo-home``, ``$CARGO_HOME`` or ``~/.cargo`` (it must reach the project's
dependencies: a network, a vendored registry, or a warm cache with ``--offline``).
The one-line change is a comment line appended to ``--edit`` (default: the root
package's ``src/main.rs`` or ``src/lib.rs``, else the first member's), or with
``--edit-kind code`` one more public function each time.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from realistic import empty_trash, retire

EDIT_MARKER = "// rsnap bench edit "


@dataclass
class Project:
    root: Path
    origin: Path
    cargo_home: Path
    edit_file: str
    extra_env: dict[str, str] = field(default_factory=dict)
    lockfile: bytes | None = None  # Cargo.lock to put in every clone when the repository has none
    edit_kind: str = "comment"
    server: object | None = None  # a registry server to stop at the end (bench/debian_project.py)

    @property
    def ws(self) -> Path:
        return self.root / "ws"

    @property
    def target(self) -> Path:
        return self.ws / "target"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR", "RUSTC_WRAPPER")}
        env.update(CARGO_HOME=str(self.cargo_home), CARGO_TERM_COLOR="never", **self.extra_env)
        return env

    def fresh_clone(self) -> None:
        retire(self.ws, self.root)
        subprocess.run(["git", "clone", "-q", str(self.origin), str(self.ws)], check=True)
        if self.lockfile is not None and not (self.ws / "Cargo.lock").exists():
            (self.ws / "Cargo.lock").write_bytes(self.lockfile)

    def edit_leaf(self, tag: int) -> None:
        """Append a comment line (edit_kind "comment"), or with edit_kind "code", one more public
        function than the tag before (new code in the crate)."""
        path = self.ws / self.edit_file
        lines = [line for line in path.read_text().splitlines()
                 if not line.startswith(EDIT_MARKER) and not line.endswith(EDIT_MARKER.strip())]
        if self.edit_kind == "code":
            lines += [f"#[allow(dead_code)] #[doc(hidden)] pub fn rsnap_bench_edit_{i}() -> u64 {{ {i} * 7919 }} "
                      f"{EDIT_MARKER.strip()}" for i in range(1, tag + 1)]
        else:
            lines.append(f"{EDIT_MARKER}{tag}")
        path.write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        empty_trash(self.root)


def default_edit_file(ws: Path, env: dict[str, str]) -> str:
    """The root package's main.rs/lib.rs, else the first workspace member's."""
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ws, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    manifests = [Path(p["manifest_path"]).parent for p in meta["packages"]]
    manifests.sort(key=lambda d: (d != ws, str(d)))
    for d in manifests:
        for name in ("src/main.rs", "src/lib.rs"):
            if (d / name).is_file():
                return str((d / name).relative_to(ws))
    raise SystemExit(f"no src/main.rs or src/lib.rs in {ws}; pass --edit FILE")


def setup(root: Path, origin: Path, cargo_home: Path | None, edit_file: str | None,
          extra_env: dict[str, str] | None = None) -> Project:
    if not (origin / ".git").exists():
        raise SystemExit(f"--project {origin} is not a git repository (the benchmark clones it)")
    home = cargo_home or Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo")
    project = Project(root, origin.resolve(), home.resolve(), edit_file or "", dict(extra_env or {}))
    root.mkdir(parents=True, exist_ok=True)
    empty_trash(root)
    project.fresh_clone()
    if not project.edit_file:
        project.edit_file = default_edit_file(project.ws, project.env)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "Cargo.lock"], cwd=project.ws,
                             capture_output=True).returncode == 0
    subprocess.run(["cargo", "fetch"], cwd=project.ws, env=project.env, check=True)
    if not tracked:  # a library without a committed lockfile: pin the one cargo just made
        project.lockfile = (project.ws / "Cargo.lock").read_bytes()
    return project
