"""Running the rsnap CLI against a fixture workspace."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RsnapResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def data(self) -> dict:
        return json.loads(self.stdout)

    def check(self) -> "RsnapResult":
        assert self.returncode == 0, f"rsnap failed ({self.returncode}):\n{self.stderr}"
        return self


def rsnap(ws, store: Path, *args: str, env_extra: dict | None = None, cwd: Path | None = None) -> RsnapResult:
    """`rsnap <args> --json` with the workspace's cargo env and the given store."""
    env = {**ws.env, "RSNAP_STORE": str(store), **(env_extra or {})}
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "rsnap", *args]
    proc = subprocess.run(cmd, cwd=cwd or ws.root, env=env, capture_output=True, text=True)
    return RsnapResult(proc.returncode, proc.stdout, proc.stderr)


def one_line_error(res: RsnapResult) -> str:
    """The error output must be a single `rsnap: error:` line, never a traceback."""
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith("rsnap: error:"), res.stderr
    return lines[0]


def stat_tree(root: Path) -> dict[str, tuple]:
    """relpath -> (ino, size, mtime_ns, ctime_ns) of every file below root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = Path(dirpath, fn)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def cold_runner(ws) -> None:
    """A new CI runner: fresh clone at the same path, no target/, empty CARGO_HOME caches."""
    import shutil
    ws.clone_fresh(allow_dirty=True)
    for sub in ("registry", "git"):
        shutil.rmtree(ws.cargo_home / sub, ignore_errors=True)


def rebuild_sets(entries: list[dict]) -> tuple[set, set]:
    """(compiled units as (package, target name, cargo kind), packages whose build script runs) of a
    `rebuild`/`rebuilt` list from rsnap restore/status/explain --json."""
    kinds = {"build-script": "custom-build"}
    compiled = {(e["package"], e["name"], kinds.get(e["target"], e["target"]))
                for e in entries if e["target"] != "run-build-script"}
    return compiled, {e["package"] for e in entries if e["target"] == "run-build-script"}


def cargo_sets(build) -> tuple[set, set]:
    """The same two sets from what cargo did (cargo_util.BuildResult: fresh:false artifacts, -v Running lines)."""
    return build.compiled_units(), set(build.scripts_run)


def build_and_save(ws) -> tuple[Path, dict]:
    """`cargo build` + `cargo test --no-run`, then `rsnap save` into `<ws>/../store`:
    (store, save --json). Sets ws.expected_output to the program's output."""
    ws.build("build")
    ws.build("test", "--no-run")
    store = ws.root.parent / "store"
    out = rsnap(ws, store, "save", "--json").check().data
    ws.expected_output = ws.run_app()
    return store, out
