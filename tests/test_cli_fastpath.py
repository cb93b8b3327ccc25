"""The fast argv path for restore/save (rsnap/cli/entry.py) must mean exactly what typer means.

restore and save skip typer's start-up; these tests hold the two parsers together: the same
options, and for any mix of options, `=` forms, repeats and environment variables, the same
arguments reach rsnap.cli.commands. Anything the fast path does not recognise goes to typer.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from unittest import mock

import pytest
import typer
from hypothesis import given, settings, strategies as st

from rsnap.cli import app as cli, commands, entry

COMMANDS = ("restore", "save")
ENV_VARS = sorted(set(entry.FAST_ENV.values()))
SETTINGS = settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")), database=None)


def typer_options(command: str) -> dict[str, str]:
    """{option string: parameter name} as typer declares them (without --help)."""
    group = typer.main.get_command(cli.app)
    params = group.commands[command].params
    return {opt: p.name for p in params for opt in [*p.opts, *p.secondary_opts] if opt != "--help"}


def typer_envvars(command: str) -> dict[str, str]:
    group = typer.main.get_command(cli.app)
    return {p.name: p.envvar for p in group.commands[command].params if getattr(p, "envvar", None)}


@pytest.mark.parametrize("command", COMMANDS)
def test_fast_path_knows_exactly_typers_options(command):
    fast = {opt: param for opt, (param, _kind) in entry.FAST_OPTIONS[command].items()}
    assert fast == typer_options(command)
    fast_env = {p: v for p, v in entry.FAST_ENV.items() if p in fast.values()}
    assert fast_env == typer_envvars(command)


def bound(fn, args, kwargs) -> dict:
    sig = inspect.signature(fn)
    b = sig.bind(*args, **kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def via_typer(command: str, argv: list[str]) -> dict:
    seen = {}
    real = getattr(commands, command)

    def record(*args, **kwargs):
        seen.update(bound(real, args, kwargs))
    with mock.patch.object(commands, command, record):
        cli.app(args=argv, prog_name="rsnap", standalone_mode=False)
    return seen


def via_fast_path(argv: list[str]) -> dict | None:
    parsed = entry.parse_fast(argv)
    if parsed is None:
        return None
    name, kwargs = parsed
    return bound(getattr(commands, name), (), kwargs)


VALUES = st.text(alphabet="abcXYZ019./_=:+", min_size=0, max_size=8).filter(lambda v: not v.startswith("-"))
ENV_VALUES = {
    "RSNAP_KEEP_CARGO_HOME": st.sampled_from(["", "1", "0", "true", "false", "yes", "no", "on", "off", "TRUE", "Off"]),
}


@st.composite
def invocations(draw):
    command = draw(st.sampled_from(COMMANDS))
    options = list(entry.FAST_OPTIONS[command].items())
    argv = [command]
    for opt, (_param, kind) in draw(st.lists(st.sampled_from(options), max_size=7)):
        if kind == "flag":
            argv.append(opt)
            continue
        value = draw(VALUES)
        if draw(st.booleans()):
            argv.append(f"{opt}={value}")
        elif value:
            argv += [opt, value]
    env = {}
    for var in ENV_VARS:
        if draw(st.booleans()):
            env[var] = draw(ENV_VALUES.get(var, VALUES))
    return argv, env


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra)
    return env


@SETTINGS
@given(invocations())
def test_fast_path_and_typer_pass_the_same_arguments(case):
    argv, env = case
    with mock.patch.dict(os.environ, clean_env(env), clear=True):
        fast = via_fast_path(argv)
        assert fast is not None, f"the fast path declined a plain invocation: {argv} {env}"
        assert fast == via_typer(argv[0], argv), (argv, env)


@pytest.mark.parametrize("argv", [
    ["restore", "--help"], ["save", "--bogus"], ["restore", "--json=1"], ["save", "--store"],
    ["restore", "--store", "--json"], ["save", "extra"], ["restore", "--", "--json"], ["store", "ls"],
    ["gc"], [], ["--version"], ["save", "-qj"],
])
def test_fast_path_declines_anything_unusual(argv):
    assert entry.parse_fast(argv) is None


def test_fast_path_declines_a_bad_boolean_env_value():
    assert entry.parse_fast(["save"], {"RSNAP_KEEP_CARGO_HOME": "maybe"}) is None


@pytest.mark.parametrize("argv, message", [
    (["restore", "--bogus"], "No such option: --bogus"),
    (["save", "--json=1"], "does not take a value"),
    (["store", "ls", "--nope"], "No such option: --nope"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rsnap", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rsnap: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_restore_and_save_do_not_import_typer(tmp_path):
    """The point of the fast path: a plain restore/save never loads typer (or pydantic)."""
    probe = ("import os, sys, runpy\n"
             "def report(code=0):\n"
             "    print('typer' in sys.modules, 'pydantic' in sys.modules, file=sys.stderr, flush=True)\n"
             "    real_exit(code)\n"
             "real_exit, os._exit = os._exit, report  # the fast path ends with os._exit\n"
             "sys.argv = ['rsnap', 'restore', '--store', sys.argv[1], '--json']\n"
             "try:\n    runpy.run_module('rsnap', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "report()\n")
    (tmp_path / "Cargo.toml").write_text('[package]\nname = "p"\nversion = "0.1.0"\nedition = "2021"\n')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.rs").write_text("")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "store")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert '"result": "miss"' in proc.stdout, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False False"
