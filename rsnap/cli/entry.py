"""The `rsnap` console script: error handling, and a fast path for restore and save.

`rsnap restore` and `rsnap save` run in every CI job, and importing typer (with the
pydantic it now pulls in) costs ~0.3 s, a third of a restore. So a plain invocation of
those two commands (only the options below, no --help) is parsed here and run without
typer; anything else goes to the typer CLI in rsnap/cli/app.py, which owns help texts and
usage errors. tests/test_cli_fastpath.py checks both parsers agree on every option.
"""
from __future__ import annotations

import errno
import os
import sys

# Every CI job pays rsnap's start-up. Without cached bytecode (an editable install under
# PYTHONDONTWRITEBYTECODE=1, as on many CI images) each run recompiles rsnap's modules:
# ~0.1 s. pip writes bytecode for installed packages anyway; let Python cache ours.
sys.dont_write_bytecode = False

from .. import timings  # noqa: E402 - starts the clock of --json's `timings`
from ..errors import RsnapError, EXIT_NOSPACE, EXIT_USAGE

# option -> (parameter, kind); kind is "value", "multi" (repeatable value) or "flag"
_COMMON = {"--store": ("store", "value"), "--scope": ("scope", "value"), "--key": ("key", "value"), "--manifest-path": ("manifest_path", "value"),
           "--json": ("as_json", "flag"), "--quiet": ("quiet", "flag"), "-q": ("quiet", "flag")}
FAST_OPTIONS = {
    "restore": {**_COMMON, "--restore-key": ("restore_key", "multi"), "--allow-relocate": ("allow_relocate", "flag"),
                "--read-scope": ("read_scope", "multi")},
    "save": {**_COMMON, "--no-gc": ("no_gc", "flag"), "--max-size": ("max_size", "value"),
             "--keep-cargo-home": ("keep_cargo_home", "flag")},
}
# parameter -> environment variable typer reads it from when the option is absent
FAST_ENV = {"store": "RSNAP_STORE", "scope": "RSNAP_SCOPE", "key": "RSNAP_KEY", "max_size": "RSNAP_MAX_SIZE",
            "keep_cargo_home": "RSNAP_KEEP_CARGO_HOME"}
_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}


def parse_fast(argv: list[str], environ=os.environ) -> tuple[str, dict] | None:
    """(command, keyword arguments) for a plain restore/save invocation, else None (use typer)."""
    if not argv or argv[0] not in FAST_OPTIONS:
        return None
    table = FAST_OPTIONS[argv[0]]
    kwargs: dict = {param: ([] if kind == "multi" else False if kind == "flag" else None)
                    for param, kind in table.values()}
    args = iter(argv[1:])
    for token in args:
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in table:
            return None
        param, kind = table[name]
        if kind == "flag":
            if eq:
                return None
            kwargs[param] = True
            continue
        value = inline if eq else next(args, None)
        if value is None or (not eq and value.startswith("-")):
            return None
        if kind == "multi":
            kwargs[param].append(value)
        else:
            kwargs[param] = value
    for param, var in FAST_ENV.items():
        if param not in kwargs or not environ.get(var):
            continue
        value = environ[var]
        if isinstance(kwargs[param], bool):
            if kwargs[param]:
                continue
            if value.lower() not in _TRUE | _FALSE:
                return None  # typer reports the bad value
            kwargs[param] = value.lower() in _TRUE
        elif kwargs[param] is None:
            kwargs[param] = value
    for param in ("restore_key", "read_scope"):
        if param in kwargs and not kwargs[param]:
            kwargs[param] = None
    return argv[0], kwargs


def run(argv: list[str]) -> int:
    fast = parse_fast(argv)
    if fast is not None:
        from ..cargo import prefetch
        name, kwargs = fast
        prefetch.start_discovery(kwargs["manifest_path"])  # runs while the rest is imported
        timings.mark("spawn")
        from . import commands
        timings.mark("imports")
        getattr(commands, name)(**kwargs)
        return FAST_DONE
    from .app import app
    code = app(args=argv, prog_name="rsnap", standalone_mode=False)
    return code if isinstance(code, int) else 0


FAST_DONE = -1  # run(): a fast-path command finished (exit 0)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every expected failure is one line on stderr and a documented exit code."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
        if code == FAST_DONE:
            _exit_now()
        sys.exit(code)
    except RsnapError as e:
        print(f"rsnap: error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except OSError as e:
        code = EXIT_NOSPACE if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 1
        print(f"rsnap: error: {e.strerror or e} ({e.filename})", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:
        print("rsnap: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the user gets one line, developers set RSNAP_DEBUG
        if os.environ.get("RSNAP_DEBUG"):
            raise
        sys.exit(_report_unexpected(e))


def _exit_now() -> None:
    """End a finished restore/save without the interpreter's teardown (~30 ms of freeing objects
    and joining idle pool threads, paid by every CI job). Everything rsnap wrote is already
    in place (store objects fsynced and renamed, files closed); only stdio needs flushing."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # nobody reads our output any more
        pass
    os._exit(0)


def _report_unexpected(e: Exception) -> int:
    if type(e).__name__ == "Abort":  # click's Ctrl-C / EOF at a prompt
        return 130
    if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # a click usage error (typer vendors click)
        hint = ""
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        print(f"rsnap: error: {e.format_message()}{hint}", file=sys.stderr)
        return EXIT_USAGE if e.exit_code == 2 else e.exit_code
    print(f"rsnap: internal error: {type(e).__name__}: {e} (set RSNAP_DEBUG=1 for a traceback)", file=sys.stderr)
    return 1
