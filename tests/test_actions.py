"""restore/action.yml and save/action.yml: their `run:` steps executed in bash the way the
runner executes a composite step (no docker needed).

The runner evaluates `${{ inputs.x }}` in `env:` (an unset input takes its `default`), sets
them as environment variables, runs the script with `bash -e {0}` in `working-directory`,
and reads `name=value` lines from the file in $GITHUB_OUTPUT (and $GITHUB_ENV/$GITHUB_PATH for
later steps). That is what `run_action` models; `rsnap` on PATH is a shim for this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the action.yml files")

REPO = Path(__file__).resolve().parents[1]


def _eval(expr: str, inputs: dict) -> str:
    return re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m[1]], expr)


RUNTIME_VARS = ("ACTIONS_RESULTS_URL", "ACTIONS_RUNTIME_TOKEN", "ACTIONS_CACHE_SERVICE_V2")
SCRIPT_ACTION = "actions/github-script@"   # the one `uses:` step: runs its `script` in node


def run_action(action: str, given: dict, cwd: Path, env: dict, runtime: dict | None = None,
               tmp: Path | None = None) -> tuple[dict, dict, str]:
    """Run every step of the composite action; returns (outputs, GITHUB_ENV entries, log).

    `runtime` is what the runner gives JavaScript steps only (the cache service's URL and
    token): the github-script step gets it, `run:` steps do not. `tmp` is RUNNER_TEMP (shared
    by the actions of one job; default one per action)."""
    spec = yaml.safe_load((REPO / action / "action.yml").read_text())
    unknown = set(given) - set(spec["inputs"])
    assert not unknown, f"not inputs of {action}: {unknown}"
    inputs = {k: str(given.get(k, v.get("default", ""))) for k, v in spec["inputs"].items()}
    tmp = tmp or cwd.parent / f"gh-{action}"
    tmp.mkdir(exist_ok=True)
    files = {n: tmp / n for n in ("output", "env", "path", "summary")}
    for n, f in files.items():
        if n != "summary" or not f.exists():
            f.write_text("")
    env = {k: v for k, v in env.items() if k not in RUNTIME_VARS}
    step_outputs, log = {}, ""
    for step in spec["runs"]["steps"]:
        base = dict(env, GITHUB_OUTPUT=str(files["output"]), GITHUB_ENV=str(files["env"]),
                    GITHUB_PATH=str(files["path"]), GITHUB_STEP_SUMMARY=str(files["summary"]),
                    RUNNER_TEMP=str(tmp), GITHUB_ACTION_PATH=str(REPO / action))
        if "uses" in step:
            assert step["uses"].startswith(SCRIPT_ACTION), step["uses"]
            wrapped = f"(async () => {{\n{step['with']['script']}\n}})().catch((e) => {{ console.error(e); process.exit(1); }});"
            proc = subprocess.run(["node", "-e", wrapped], cwd=cwd, env=dict(base, **(runtime or {})),
                                  capture_output=True, text=True)
            log += proc.stdout + proc.stderr
            assert proc.returncode == 0, log
            continue
        assert step["shell"] == "bash"
        script = tmp / f"{step['id']}.sh"
        script.write_text(step["run"])
        assert "${{" not in step["run"], "inputs reach the script through env only"
        step_env = dict(base, **{k: _eval(v, inputs) for k, v in step.get("env", {}).items()})
        wd = cwd / _eval(step.get("working-directory", "."), inputs)
        proc = subprocess.run(["bash", "-e", str(script)], cwd=wd, env=step_env, capture_output=True, text=True)
        log += proc.stdout + proc.stderr
        assert proc.returncode == 0, log
        step_outputs[step["id"]] = dict(l.split("=", 1) for l in files["output"].read_text().splitlines() if l)
    outputs = {}
    for name, out in spec.get("outputs", {}).items():
        m = re.fullmatch(r"\$\{\{\s*steps\.([\w-]+)\.outputs\.([\w-]+)\s*\}\}", out["value"])
        outputs[name] = step_outputs[m[1]].get(m[2], "")
    ghenv = dict(l.split("=", 1) for l in files["env"].read_text().splitlines() if l)
    return outputs, ghenv, log


@pytest.fixture
def runner(tmp_path):
    """A workspace (the bundled example), a CARGO_HOME, and `rsnap` on PATH."""
    ws = tmp_path / "repo"
    shutil.copytree(REPO / "examples" / "hello", ws, ignore=shutil.ignore_patterns("target"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "rsnap"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m rsnap "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", CARGO_HOME=str(tmp_path / "cargo-home"),
               PYTHONPATH=str(REPO))
    env.pop("RSNAP_STORE", None)
    env.pop("RSNAP_KEY", None)
    return ws, env


def _cargo(ws, env):
    return subprocess.run(["cargo", "build", "-q"], cwd=ws, env=env, check=True, capture_output=True)


def test_restore_miss_build_save_then_exact_hit(runner, tmp_path):
    ws, env = runner
    store = tmp_path / "store"
    out, ghenv, _ = run_action("restore", {"store": str(store)}, ws, env)
    assert out["cache-hit"] == "false" and out["result"] == "miss" and out["cache-matched-key"] == ""
    assert ghenv["RSNAP_STORE"] == str(store)
    primary = out["cache-primary-key"]
    _cargo(ws, env)
    saved, _, _ = run_action("save", {"key": primary}, ws, dict(env, **ghenv))
    assert saved["key"] == primary

    shutil.rmtree(ws / "target")
    out, _, _ = run_action("restore", {"store": str(store)}, ws, env)
    assert out == {"cache-hit": "true", "cache-matched-key": primary, "cache-primary-key": primary,
                   "result": "exact"}
    assert (ws / "target" / "debug" / "hx-app").exists()


def ci_run(ws, env, **inputs) -> None:
    """One job: the restore action, cargo, the save action, with the same inputs (and, as on a
    runner, what the restore put in GITHUB_ENV for the later steps)."""
    _, ghenv, _ = run_action("restore", inputs, ws, env)
    _cargo(ws, dict(env, **ghenv))
    run_action("save", {**inputs, "prune-keep": ""}, ws, dict(env, **ghenv))


def test_restore_keys_fall_back_and_scope_is_exported(runner, tmp_path):
    ws, env = runner
    store = tmp_path / "store"
    ci_run(ws, env, store=str(store), key="ci-main-1")

    out, ghenv, _ = run_action("restore", {"store": str(store), "key": "ci-feature-2", "scope": "",
                                           "restore-keys": "  ci-feature-\n\n  ci-main-  \n"}, ws, env)
    assert out["result"] == "partial" and out["cache-hit"] == "false"
    assert out["cache-matched-key"] == "ci-main-1" and out["cache-primary-key"] == "ci-feature-2"
    assert "RSNAP_SCOPE" not in ghenv

    _, ghenv, _ = run_action("restore", {"store": str(store), "scope": "refs/heads/main"}, ws, env)
    assert ghenv["RSNAP_SCOPE"] == "refs/heads/main"


def test_working_directory_and_missing_rsnap_without_install(runner, tmp_path):
    ws, env = runner
    store = tmp_path / "store"
    out, _, _ = run_action("restore", {"store": str(store), "working-directory": "repo"}, tmp_path, env)
    assert out["result"] == "miss"
    bare = dict(env, PATH="/usr/bin:/bin")
    with pytest.raises(AssertionError, match="rsnap is not on PATH"):
        run_action("restore", {"store": str(store), "install": ""}, ws, bare)


def test_branch_scope_falls_back_to_main_scope_and_saves_into_its_own(runner, tmp_path):
    ws, env = runner
    store = tmp_path / "store"
    ci_run(ws, env, store=str(store), scope="main")
    shutil.rmtree(ws / "target")
    out, ghenv, _ = run_action("restore", {"store": str(store), "scope": "pr-7", "read-scopes": "main\n"}, ws, env)
    assert out["result"] == "exact" and ghenv["RSNAP_SCOPE"] == "pr-7"
    run_action("save", {"store": str(store), "scope": "pr-7", "prune-keep": ""}, ws, env)
    assert list((store / "scopes" / "pr-7" / "snapshots").iterdir())
    assert not (store / "snapshots").exists()


def test_actions_default_to_the_gha_store_and_never_leak_the_token(runner, tmp_path, gha_server):
    """No store given, the runner's cache service at hand (given to JavaScript steps only): the
    actions pass it on to rsnap through a private file, use gha://, and write job summaries."""
    ws, env = runner
    runtime, token = gha_server.env(), gha_server.token
    job1 = tmp_path / "job1"        # RUNNER_TEMP of one job, shared by its restore and save
    job1.mkdir()
    out, ghenv, log = run_action("restore", {}, ws, env, runtime=runtime, tmp=job1)
    assert out["result"] == "miss" and ghenv["RSNAP_STORE"] == "gha://rsnap" and ghenv["CARGO_INCREMENTAL"] == "1"
    assert stat.S_IMODE((job1 / "rsnap-runtime.env").stat().st_mode) == 0o600
    _cargo(ws, dict(env, **ghenv))
    saved, _, log2 = run_action("save", {}, ws, dict(env, **ghenv), runtime=runtime, tmp=job1)
    assert saved["key"] == out["cache-primary-key"]     # CARGO_INCREMENTAL, a key input, was set before the restore
    assert f"rsnap/snapshots/{saved['key']}/" in " ".join(gha_server.keys())
    for text in (log, log2, (job1 / "env").read_text(), (job1 / "summary").read_text()):
        assert token not in text
    assert "| hit | miss" in (job1 / "summary").read_text()

    # the next job, a fresh runner: exact hit; an edit rebuilds one crate, and the summary says so
    shutil.rmtree(ws / "target")
    job2 = tmp_path / "job2"
    job2.mkdir()
    out, ghenv, _ = run_action("restore", {}, ws, env, runtime=runtime, tmp=job2)
    assert out["result"] == "exact"
    assert f"| hit | exact: `{saved['key']}`" in (job2 / "summary").read_text()
    assert re.search(r"\| moved \| [\d.]+ [KM]B in \d+ entries down", (job2 / "summary").read_text())
    main = ws / "crates" / "app" / "src" / "main.rs"
    main.write_text(main.read_text() + "\n// edited\n")
    _cargo(ws, dict(env, **ghenv))
    entries = len(gha_server.entries())
    run_action("save", {"key": "edited"}, ws, dict(env, **ghenv), runtime=runtime, tmp=job2)
    summary = (job2 / "summary").read_text()
    assert "| cargo rebuilt | 1 of" in summary and "hx-app (crates/app/src/main.rs changed)" in summary, summary
    assert len(gha_server.entries()) - entries == 2     # one new pack, one manifest
    # a user's own CARGO_INCREMENTAL stays as it is
    _, ghenv, _ = run_action("restore", {}, ws, dict(env, CARGO_INCREMENTAL="0"), runtime=runtime, tmp=tmp_path / "job3")
    assert "CARGO_INCREMENTAL" not in ghenv


def test_install_defaults_to_the_actions_own_checkout(runner, tmp_path):
    """No rsnap on PATH: the restore action pip-installs rsnap from its own checkout (the
    action's ref pins the version) into a venv in RUNNER_TEMP, never a PyPI package named rsnap."""
    ws, env = runner
    pybin = tmp_path / "python-only"
    pybin.mkdir()
    (pybin / "python3").symlink_to(sys.executable)
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    bare["PATH"] = os.pathsep.join([str(pybin), str(Path(shutil.which("cargo")).parent), "/usr/bin", "/bin"])
    assert subprocess.run(["bash", "-c", "command -v rsnap"], env=bare, capture_output=True).returncode == 1
    out, ghenv, log = run_action("restore", {"store": str(tmp_path / "store")}, ws, bare)
    assert out["result"] == "miss", log
    venv_bin = (tmp_path / "gh-restore" / "path").read_text().strip()
    assert venv_bin == str(tmp_path / "gh-restore" / "rsnap-venv" / "bin")
    where = subprocess.run([f"{venv_bin}/python", "-c", "import rsnap.store.gha as g; print(g.__file__)"],
                           env=bare, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(tmp_path / "gh-restore" / "rsnap-venv"))    # this checkout's code, installed
