"""The harness itself, against real cargo: these facts are what rsnap builds on."""

from __future__ import annotations

import shutil

from cargo_util import (ALL_PACKAGES, BUILD_SCRIPT_PACKAGES, INITIAL_REGDEP, WORKSPACE_PACKAGES,
                        mkgitdep, mkregistry, normalize_output, package_name)


def test_package_name_forms():
    assert package_name("path+file:///w/crates/app#0.1.0") == "app"
    assert package_name("path+file:///w/crates/core#ws-core@0.1.0") == "ws-core"
    assert package_name("registry+https://github.com/rust-lang/crates.io-index#regdep@1.0.0") == "regdep"
    assert package_name("git+file:///tmp/gitdep?branch=main#0.1.0") == "gitdep"


def test_clean_build_compiles_all_then_noop(make_workspace, registry, template_output):
    ws = make_workspace()
    lock = ws.read("Cargo.lock")
    assert "registry+https://github.com/rust-lang/crates.io-index" in lock
    assert "127.0.0.1" not in lock  # source replacement keeps the lock port-independent

    first = ws.build()
    assert first.compiled() == ALL_PACKAGES
    assert first.scripts_run == BUILD_SCRIPT_PACKAGES
    out = ws.run_app()
    assert f"regdep {INITIAL_REGDEP} " in out
    assert normalize_output(out, ws.root) == template_output
    assert any(d.startswith("/dl/regdep-") for d in registry.downloads())

    # cargo keeps the .crate tar headers' mtimes when extracting into registry/src
    # (Cargo.toml is the exception: it gets 1153704088, tar-rs's deterministic time).
    [src] = ws.cargo_home.glob("registry/src/*/regsys-0.1.0")
    assert int((src / "native/config.txt").stat().st_mtime) == mkregistry.CRATE_MTIME

    again = ws.build()
    assert again.all_fresh(), again.summary()
    # build-script-executed is reported even for fresh runs (no freshness flag)
    assert {package_name(m["package_id"]) for m in again.script_outputs} == BUILD_SCRIPT_PACKAGES


def test_fresh_clone_with_old_target_rebuilds_workspace_crates(make_workspace):
    ws = make_workspace()
    ws.build()
    ws.clone_fresh(keep_target=True)
    res = ws.build()
    # The problem rsnap solves: new mtimes dirty every workspace crate ...
    assert res.compiled() == WORKSPACE_PACKAGES, res.summary()
    assert any("has changed" in r for rs in res.dirty_reasons.values() for r in rs)
    # ... and ws-gen's rerun-if-changed input; registry and git crates stay fresh.
    assert res.scripts_run == {"ws-gen"}


def test_cargo_test_passes(make_workspace):
    ws = make_workspace()
    res = ws.build("test")
    assert {(u.package, u.target) for u in res.units if u.test} >= {("ws-util", "it"), ("app", "cli")}
    assert "test result: ok" in res.stdout


def test_editing_build_script_input_reruns_it(make_workspace):
    ws = make_workspace()
    ws.build()
    ws.append("crates/gen/data/words.txt", "delta\n")
    res = ws.build()
    assert res.scripts_run == {"ws-gen"}, res.summary()
    assert res.compiled() == {"ws-gen", "app"}
    out = ws.run_app()
    assert "words=alpha,bravo,charlie,delta count=4" in out
    assert out == ws.clean_output()


def test_precise_registry_update_changes_output(make_workspace):
    ws = make_workspace()
    ws.build()
    ws.cargo("update", "-p", "regdep", "--precise", "1.0.1")
    res = ws.build()
    assert res.compiled() == {"regdep", "app"}, res.summary()
    assert "regdep 1.0.1 [hello from regdep one-oh-one (patched)]" in ws.run_app()


def test_commit_and_clone_fresh_keeps_edits(make_workspace):
    ws = make_workspace()
    ws.replace("crates/core/src/lib.rs", "REVISION: u32 = 1", "REVISION: u32 = 2")
    ws.commit("core rev 2")
    ws.clone_fresh()
    assert not ws.target.exists()
    assert "REVISION: u32 = 2" in ws.read("crates/core/src/lib.rs")


def test_feature_toggle_rebuilds_registry_crate(make_workspace):
    ws = make_workspace()
    ws.build()
    res = ws.build("build", "--features", "app/shout")
    assert res.compiled() == {"regdep", "app"}, res.summary()
    assert f"REGDEP {INITIAL_REGDEP} [HELLO" in ws.run_app()


def test_gitdep_upstream_commit_and_update(make_workspace, tmp_path):
    repo = tmp_path / "gitdep"
    ws = make_workspace(gitdep=mkgitdep.make_gitdep(repo))
    ws.build()
    mkgitdep.commit_greeting(repo, "gitdep third commit")
    ws.cargo("update", "-p", "gitdep")
    res = ws.build()
    assert res.compiled() == {"gitdep", "app"}, res.summary()
    assert "gitdep 0.1.0 [gitdep third commit]" in ws.run_app()


def test_cargo_ignores_mtimes_under_cargo_home(make_workspace):
    """Cargo skips mtime checks for files under $CARGO_HOME/registry and /git, even
    a registry build script's rerun-if-changed input; a deleted registry/src is
    re-extracted from registry/cache without touching the network."""
    ws = make_workspace()
    ws.build()
    [src] = ws.cargo_home.glob("registry/src/*/regsys-0.1.0")
    (src / "native/config.txt").touch()
    res = ws.build()
    assert res.all_fresh(), res.summary()
    shutil.rmtree(ws.cargo_home / "registry" / "src")
    shutil.rmtree(ws.cargo_home / "git" / "checkouts")
    res = ws.build("build", "--offline")
    assert res.all_fresh(), res.summary()
    assert (src / "native/config.txt").is_file()
