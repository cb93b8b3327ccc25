"""`rsnap cargo <args>`: run cargo and log the units it used, the exact usage signal of rsnap.cargo.usage.

Cargo runs with `--message-format=json-render-diagnostics` (human diagnostics still go to
stderr; non-JSON stdout such as test or `cargo run` output is forwarded). Every
`compiler-artifact` (fresh or not) and `build-script-executed` message is mapped to its
unit (profile dir + 16-hex hash; uplifted files such as `target/debug/app` are resolved
through their hard link in `deps/` / `build/<pkg>/<hash>/out/`), and one line per
invocation is appended to `<target>/.rsnap/used.jsonl`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .layout import RSNAP_DIR
from .target_layout import output_inodes, unit_of_path
from .usage import USED_LOG, roots

# Subcommands that build and accept --message-format.
_BUILD_COMMANDS = {"build", "b", "check", "c", "test", "t", "bench", "run", "r", "rustc", "doc", "d",
                   "rustdoc", "clippy", "fix"}
# Global options (before the subcommand) that take a separate value.
_GLOBAL_WITH_VALUE = {"--config", "-Z", "-C", "--color", "--explain"}
_CARGO_REASONS = {"compiler-artifact", "build-script-executed", "compiler-message", "build-finished"}


def _split_cargo_args(args: list[str]) -> tuple[int | None, str | None]:
    """Index and name of the cargo subcommand in args (skipping +toolchain and global options)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return None, None
        if i == 0 and a.startswith("+"):
            i += 1
            continue
        if a.startswith("-"):
            if a in _GLOBAL_WITH_VALUE:
                i += 2
            else:
                i += 1
            continue
        return i, a
    return None, None


def _message_format_args(args: list[str], sub_idx: int) -> tuple[list[str], bool]:
    """Rewrite args so cargo emits JSON on stdout. Returns (args, user_wants_json)."""
    rest = args[sub_idx + 1:]
    end = rest.index("--") if "--" in rest else len(rest)
    fmts, kept = [], []
    i = 0
    while i < end:
        a = rest[i]
        if a == "--message-format" and i + 1 < end:
            fmts.append(rest[i + 1])
            i += 2
            continue
        if a.startswith("--message-format="):
            fmts.append(a.split("=", 1)[1])
            i += 1
            continue
        kept.append(a)
        i += 1
    values = [v.strip() for f in fmts for v in f.split(",") if v.strip()]
    if any(v.startswith("json") for v in values):
        return args, True  # the user asked for JSON: pass it through untouched, parse a copy
    mine = ["json-render-diagnostics"]
    if "short" in values:
        mine.insert(0, "json-diagnostic-short")
    new = args[:sub_idx + 1] + [f"--message-format={','.join(mine)}"] + kept + rest[end:]
    return new, False


def run_cargo(args: list[str], ws=None) -> int:
    """`rsnap cargo <args>`: run cargo, forward its output, log the units it used.

    Output: stderr is inherited (cargo renders diagnostics there); stdout JSON
    messages are consumed unless the user asked for JSON, everything else (test
    harness output, `cargo run` program output) is forwarded byte for byte.
    Returns cargo's exit code. The log goes to `<target>/.rsnap/used.jsonl`.
    """
    if ws is None:
        from .layout import discover
        ws = discover()
    cargo = "cargo"
    sub_idx, sub = _split_cargo_args(args)
    if sub_idx is None or sub not in _BUILD_COMMANDS:
        return subprocess.call([cargo, *args])
    cmd_args, user_json = _message_format_args(args, sub_idx)
    started = time.time_ns()
    proc = subprocess.Popen([cargo, *cmd_args], stdout=subprocess.PIPE)
    rec = _Recorder(ws)
    out = _Forward(sys.stdout.buffer)
    passthrough = False
    buf = b""
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            if passthrough:
                out.write(chunk)
                continue
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl + 1], buf[nl + 1:]
                msg = _cargo_message(line)
                if msg is None:
                    out.write(line)
                    continue
                rec.message(msg)
                if user_json:
                    out.write(line)
                if msg.get("reason") == "build-finished":
                    # after this, stdout belongs to the program (`cargo run`) or the tests
                    passthrough = True
                    out.write(buf)
                    buf = b""
                    break
            if buf and not buf.startswith(b"{"):
                out.write(buf)   # a partial line that cannot be a cargo message: forward now
                buf = b""
        out.write(buf)
        rc = proc.wait()
    except KeyboardInterrupt:
        rc = proc.wait()
    try:
        rec.write(args, started, rc)
    except OSError as e:  # never fail the build because the log could not be written
        print(f"rsnap: warning: could not record cargo usage: {e}", file=sys.stderr)
    return rc


class _Forward:
    """Writes to our stdout; if the reader went away, keeps draining cargo silently."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken or not data:
            return
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError:
            self.broken = True
            try:  # keep the interpreter from failing on the final flush at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def _cargo_message(line: bytes) -> dict | None:
    if not line.startswith(b'{"reason":'):
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and msg.get("reason") in _CARGO_REASONS else None


class _Recorder:
    """Maps cargo JSON messages to units (root, profile dir, hash)."""

    def __init__(self, ws):
        self.roots = roots(ws)
        self.target = Path(ws.target_dir)
        self.units: set[tuple[str, str]] = set()     # (profile dir abs, hash)
        self.unresolved: list[dict] = []
        self.finished: bool | None = None
        self.artifacts: list[dict] = []
        self._inodes: dict[str, dict] = {}

    def message(self, msg: dict) -> None:
        reason = msg.get("reason")
        if reason == "build-finished":
            self.finished = bool(msg.get("success"))
        elif reason == "build-script-executed":
            out_dir = msg.get("out_dir")
            if out_dir:
                hit = unit_of_path(Path(out_dir) / "x", self.roots)
                if hit:
                    self.units.add(hit)
        elif reason == "compiler-artifact":
            # uplifted paths (target/debug/app) are resolved after the build, when
            # every hard link exists (see write())
            self.artifacts.append(msg)

    def _resolve(self) -> None:
        for msg in self.artifacts:
            resolved = False
            for fn in msg.get("filenames") or []:
                hit = unit_of_path(Path(fn), self.roots) or self._uplift_owner(Path(fn))
                if hit:
                    self.units.add(hit)
                    resolved = True
            if not resolved:
                t = msg.get("target") or {}
                self.unresolved.append({"package_id": msg.get("package_id"), "target": t.get("name"),
                                        "kind": (t.get("kind") or [None])[0],
                                        "test": bool((msg.get("profile") or {}).get("test")),
                                        "filenames": msg.get("filenames") or []})

    def _uplift_owner(self, path: Path):
        """The unit whose output `path` is a hard link of (uplifted bins, proc-macros, libs)."""
        try:
            st = path.stat()
        except OSError:
            return None
        profile = path.parent
        if profile.name == "examples":
            profile = profile.parent
        # the unit is in the same profile dir of the build dir (the target dir, or build.build-dir)
        rel = profile.relative_to(self.target) if profile.is_relative_to(self.target) else None
        for unit_profile in [profile] if rel is None else [r / rel for r in self.roots]:
            key = str(unit_profile)
            if key not in self._inodes:
                self._inodes[key] = output_inodes(unit_profile)
            h = self._inodes[key].get((st.st_dev, st.st_ino))
            if h is not None:
                return key, h
        return None

    def write(self, args, started_ns: int, rc: int) -> None:
        self._resolve()
        sd = self.target / RSNAP_DIR
        sd.mkdir(parents=True, exist_ok=True)
        rec = {"started_ns": started_ns, "finished_ns": time.time_ns(), "args": list(args), "exit": rc,
               "success": rc == 0 and self.finished is not False,
               "units": sorted([p, h] for p, h in self.units), "unresolved": self.unresolved}
        with open(sd / USED_LOG, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
