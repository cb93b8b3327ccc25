"""Target and build dirs are found the way cargo finds them: CARGO_TARGET_DIR, build.build-dir."""
from __future__ import annotations

import shutil

import pytest
from cargo_util import create_workspace
from rsnap_util import rsnap


def _cold(ws, *extra_dirs):
    ws.clone_fresh(allow_dirty=True)
    for d in extra_dirs:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(ws.cargo_home / "registry", ignore_errors=True)


def test_custom_target_dir_and_separate_build_dir(registry, gitdep_url, tmp_path):
    ws = create_workspace(tmp_path / "ws", registry.index_url, gitdep_url)
    target, build = tmp_path / "out-target", tmp_path / "out-build"
    ws.env.update(CARGO_TARGET_DIR=str(target), CARGO_BUILD_BUILD_DIR=str(build))
    ws.build("build")
    assert (build / "debug" / ".fingerprint").is_dir() and (target / "debug" / "app").is_file()
    store = tmp_path / "store"
    saved = rsnap(ws, store, "save", "--json").check().data
    status = rsnap(ws, store, "status", "--json").check().data
    assert status["target_dir"] == str(target) and status["build_dir"] == str(build)
    _cold(ws, target, build)
    res = rsnap(ws, store, "restore", "--json").check().data
    assert res["result"] == "exact" and 0 < res["files_written"] <= saved["files"]
    assert (build / "debug" / ".fingerprint").is_dir()
    out = ws.build("build", "--offline")
    assert out.all_fresh(), out.summary()
    assert not (ws.root / "target").exists()


def test_key_reports_its_inputs_and_changes_with_rustflags(built_workspace, tmp_path):
    ws = built_workspace
    plain = rsnap(ws, tmp_path / "s", "key", "--json").check().data
    assert plain["key"].startswith(plain["restore_prefix"])
    assert plain["inputs"]["workspace_root"] == str(ws.root)
    assert plain["inputs"]["cargo_home"] == str(ws.cargo_home)
    flagged = rsnap(ws, tmp_path / "s", "key", "--json", env_extra={"RUSTFLAGS": "-Cdebug-assertions=off"}).check().data
    assert flagged["inputs"]["env"]["RUSTFLAGS"] == "-Cdebug-assertions=off"
    assert flagged["key"] != plain["key"]
    assert flagged["restore_prefix"] == plain["restore_prefix"]


def test_keep_cargo_home_leaves_disk_alone_but_prunes_the_snapshot(make_workspace, tmp_path):
    from rsnap.store import open_store
    from rsnap.repository import repo
    ws = make_workspace()
    ws.build("build")
    ws.cargo("update", "-p", "regdep", "--precise", "1.0.1")
    ws.build("build")
    old = list(ws.cargo_home.glob("registry/cache/*/regdep-1.0.0.crate"))
    assert old, "cargo downloaded regdep 1.0.0 first"
    store = tmp_path / "store"
    saved = rsnap(ws, store, "save", "--json", "--keep-cargo-home").check().data
    assert all(p.exists() for p in old), "--keep-cargo-home deleted a download"
    m = repo.read_manifest(open_store(str(store)), saved["snapshot"])
    names = {e.path.rsplit("/", 1)[-1] for e in m.root("cargo_home").entries}
    assert "regdep-1.0.1.crate" in names and "regdep-1.0.0.crate" not in names
    rsnap(ws, store, "save", "--json").check()
    assert not any(p.exists() for p in old), "default save prunes unreferenced downloads"


def test_path_dependency_outside_the_workspace_is_normalized(tmp_path):
    """A path dependency outside the workspace root (repo/extlib beside repo/app) is found by the
    resolving `cargo metadata`, so its sources are recorded and re-timed: fresh after a fresh
    clone, rebuilt (never stale) when it was edited."""
    import subprocess
    repo = _GitProject(tmp_path, {
        "app/Cargo.toml": '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n\n'
                          '[dependencies]\nextlib = { path = "../extlib" }\n',
        "app/src/main.rs": 'fn main() { println!("{}", extlib::answer()); }\n',
        "extlib/Cargo.toml": '[package]\nname = "extlib"\nversion = "0.1.0"\nedition = "2021"\n',
        "extlib/src/lib.rs": "pub fn answer() -> u32 { 41 }\n",
        # no rerun-if-changed: cargo reruns the script when any file of the package is newer
        "extlib/build.rs": "fn main() {}\n",
        "extlib/notes.txt": "read by nobody, checked by cargo\n",
    }, workdir="app")
    subprocess.run(["cargo", "generate-lockfile", "--offline"], cwd=repo.origin / "app", env=repo.env, check=True,
                   capture_output=True)
    repo.commit()
    repo.fresh_clone()
    assert repo.build().compiled() == {"app", "extlib"}
    assert repo.rsnap("save")["sources"] >= 4
    repo.fresh_clone()
    assert repo.rsnap("restore")["result"] == "exact"
    again = repo.build()
    assert again.all_fresh(), again.summary()
    repo.fresh_clone()
    (repo.checkout / "extlib" / "src" / "lib.rs").write_text("pub fn answer() -> u32 { 42 }\n")
    assert repo.rsnap("restore")["result"] == "exact"
    assert repo.build().compiled() == {"app", "extlib"}
    assert repo.output() == "42"


def test_manifest_path_from_another_directory(built_workspace, tmp_path):
    """`--manifest-path` from elsewhere finds the same workspace and key as running in its root;
    what restore/save start early (cargo metadata, rustc -vV) follows the manifest path."""
    ws, elsewhere, store = built_workspace, tmp_path / "elsewhere", tmp_path / "store"
    elsewhere.mkdir()
    manifest = str(ws.root / "Cargo.toml")
    here = rsnap(ws, store, "key", "--json").check().data
    there = rsnap(ws, store, "key", "--manifest-path", manifest, "--json", cwd=elsewhere).check().data
    assert there["key"] == here["key"]
    saved = rsnap(ws, store, "save", "--no-gc", "--manifest-path", manifest, "--json", cwd=elsewhere).check().data
    assert saved["key"] == here["key"] and saved["files"] > 10
    restored = rsnap(ws, store, "restore", "--manifest-path", manifest, "--json", cwd=elsewhere).check().data
    assert restored["result"] == "exact" and restored["files_written"] == 0
    assert ws.build("build", "--offline").all_fresh()


@pytest.mark.parametrize("linked", ["file", "dir"])
def test_source_symlinked_from_outside_the_workspace_is_never_stale(tmp_path, linked):
    """`src/shared.rs` is a symlink to a file outside the repository, or `src/shared/` to a
    directory of modules there (cargo follows both). What they point to is recorded at save,
    so a runner whose copy differs, even with an old mtime, rebuilds instead of trusting the
    restored fingerprint."""
    import os
    repo = _GitProject(tmp_path, {
        "Cargo.toml": '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n',
        "src/main.rs": 'mod shared;\nfn main() { println!("{}", shared::answer()); }\n',
    })
    external = tmp_path / "external"
    external.mkdir()
    shared = external / ("shared.rs" if linked == "file" else "mod.rs")
    shared.write_text("pub fn answer() -> u32 { 1 }\n")
    if linked == "file":
        (repo.origin / "src" / "shared.rs").symlink_to(shared)
    else:
        (repo.origin / "src" / "shared").symlink_to(external, target_is_directory=True)
    repo.commit()
    repo.fresh_clone()
    assert repo.build().compiled() == {"app"}
    repo.rsnap("save")
    # another runner: its copy of the outside file differs and is older than every artifact
    shared.write_text("pub fn answer() -> u32 { 2 }\n")
    hour_ago = (repo.checkout / "target" / "debug" / "app").stat().st_mtime_ns - 3600 * 10**9
    os.utime(shared, ns=(hour_ago, hour_ago))
    repo.fresh_clone()
    repo.rsnap("restore")
    assert repo.build().compiled() == {"app"}
    assert repo.output() == "2"


@pytest.mark.parametrize("linked", ["file", "dir"])
def test_symlink_pointed_at_other_unchanged_files_is_never_stale(tmp_path, linked):
    """A commit points a symlinked source (a file, or a directory of modules) at other files of the
    repository, none of which changed. Cargo's fingerprint names the path the link resolved to
    when it was built, so plain cargo would reuse the old binary; restore pushes that old target
    forward and cargo rebuilds."""
    files = {"Cargo.toml": '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n',
             "src/main.rs": 'mod shared;\nfn main() { println!("{}", shared::answer()); }\n'}
    for v in ("1", "2"):
        files[f"src/impl{v}.rs" if linked == "file" else f"v{v}/mod.rs"] = f"pub fn answer() -> u32 {{ {v} }}\n"
    repo = _GitProject(tmp_path, files)
    link = repo.origin / "src" / ("shared.rs" if linked == "file" else "shared")
    for v in ("1", "2"):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(f"impl{v}.rs" if linked == "file" else f"../v{v}", target_is_directory=linked == "dir")
        repo.commit()
    repo.fresh_clone("HEAD~1")
    assert repo.build().compiled() == {"app"}
    assert repo.output() == "1"
    repo.rsnap("save")
    repo.fresh_clone("HEAD~1")
    repo.rsnap("restore")
    fresh = repo.build()
    assert fresh.all_fresh(), fresh.summary()
    repo.fresh_clone("HEAD")
    repo.rsnap("restore")
    assert repo.build().compiled() == {"app"}
    assert repo.output() == "2"


def test_changed_input_owned_by_another_user_is_still_pushed_forward(tmp_path, monkeypatch, capsys):
    """Only a file's owner may set its mtime to a chosen time; any writer may set it to now.
    When the first is refused (EPERM), the changed input still ends newer than every artifact."""
    import os
    import time
    from rsnap.cargo import mtimes

    path = tmp_path / "shared.rs"
    path.write_text("changed\n")
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    real_utime = os.utime

    def utime_as_non_owner(p, *args, ns=None, **kw):
        if ns is not None:
            raise PermissionError(1, "Operation not permitted", str(p))
        return real_utime(p, *args, **kw)

    monkeypatch.setattr(os, "utime", utime_as_non_owner)
    newest_artifact = old + 10**9
    stats = mtimes.RetimeStats()
    mtimes._retime(path, None, newest_artifact, newest_artifact + 10**9, stats)
    assert path.stat().st_mtime_ns > newest_artifact and stats.bumped == 1
    assert "warning" not in capsys.readouterr().err


class _GitProject:
    """Files committed into a repository at ``tmp/origin`` (a git repo as CI would clone), fresh
    clones of it at ``tmp/checkout``, and rsnap run from ``workdir`` in the clone."""

    def __init__(self, tmp_path, files: dict[str, str], workdir: str = ""):
        import subprocess
        from fixtures.tools.common import cargo_env
        self.tmp, self.origin, self.checkout = tmp_path, tmp_path / "origin", tmp_path / "checkout"
        self.workdir = self.checkout / workdir
        self.env = cargo_env(tmp_path / "home", RSNAP_STORE=str(tmp_path / "store"))
        self.env.pop("CI", None)
        for rel, text in files.items():
            (self.origin / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.origin / rel).write_text(text)
        self._git = lambda *a, cwd=self.origin: subprocess.run(["git", *a], cwd=cwd, check=True,  # noqa: E731
                                                                capture_output=True)

    def commit(self) -> None:
        if not (self.origin / ".git").exists():
            self._git("init", "-q")
        self._git("add", "-A")
        self._git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repo")

    def fresh_clone(self, rev: str | None = None) -> None:
        shutil.rmtree(self.checkout, ignore_errors=True)
        self._git("clone", "-q", str(self.origin), str(self.checkout), cwd=self.tmp)
        if rev:
            self._git("checkout", "-q", rev, cwd=self.checkout)

    def rsnap(self, *args) -> dict:
        import json
        import subprocess
        import sys
        proc = subprocess.run([sys.executable, "-m", "rsnap", *args, "--json"], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def build(self):
        from cargo_util import run_cargo_json
        return run_cargo_json(self.workdir, self.env, "build").check()

    def output(self, binary: str = "target/debug/app") -> str:
        import subprocess
        return subprocess.run([str(self.workdir / binary)], capture_output=True, text=True,
                              check=True).stdout.strip()
