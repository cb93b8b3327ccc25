"""One rustc call as cargo made it: its parsed arguments, whether it can be cached, logging
it and exec'ing rustc. On the `rsnap-rustc` hot path: imports only os and sys."""
from __future__ import annotations

import os
import sys

# Options whose value may be the next argument ("--emit x" as well as "--emit=x").
_TAKES_VALUE = {
    "--crate-name", "--crate-type", "--emit", "--out-dir", "-o", "-C", "--codegen", "-L", "-l",
    "--extern", "--target", "--sysroot", "--cfg", "--check-cfg", "--cap-lints", "--edition",
    "--error-format", "--json", "-W", "-A", "-D", "-F", "--warn", "--allow", "--deny", "--forbid",
    "--force-warn", "--print", "-Z", "--remap-path-prefix", "--remap-path-scope",
    "--diagnostic-width", "--color", "--explain", "--crate-attr", "--env-set",
}
_SHORT_WITH_VALUE = ("-C", "-L", "-l", "-Z", "-W", "-A", "-D", "-F", "-o")

# crate types whose outputs we can name and restore; dylib/cdylib export symbols to
# foreign linkers and need the dynamic-library toolchain, so they pass through.
_CACHEABLE_CRATE_TYPES = {"lib", "rlib", "staticlib", "proc-macro", "bin"}
_CACHEABLE_EMITS = {"dep-info", "metadata", "link"}


class Invocation:
    """The parsed rustc command line: `options` keeps (flag, value) pairs in order."""

    def __init__(self, rustc: str, args: list[str]):
        self.rustc = rustc
        self.args = args
        self.options: list[tuple[str, str | None]] = []
        self.inputs: list[str] = []
        self.bad: str | None = None
        self._parse()

    def _parse(self) -> None:
        args, i = self.args, 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg.startswith("@"):
                self.bad = "argfile"
            elif arg == "-" or not arg.startswith("-"):
                self.inputs.append(arg)
            elif arg.startswith("--") and "=" in arg:
                flag, value = arg.split("=", 1)
                self.options.append((flag, value))
            elif arg in _TAKES_VALUE:
                if i >= len(args):
                    self.bad = "missing-value"
                    return
                self.options.append((arg, args[i]))
                i += 1
            elif arg[:2] in _SHORT_WITH_VALUE and len(arg) > 2:
                self.options.append((arg[:2], arg[2:]))
            else:
                self.options.append((arg, None))

    def values(self, *flags: str) -> list[str]:
        return [v for f, v in self.options if f in flags and v is not None]

    def value(self, flag: str) -> str | None:
        vals = self.values(flag)
        return vals[-1] if vals else None

    def has(self, flag: str) -> bool:
        return any(f == flag for f, _ in self.options)

    def codegen(self) -> dict[str, str]:
        """-C options as a dict (later wins, like rustc)."""
        out = {}
        for v in self.values("-C", "--codegen"):
            k, _, val = v.partition("=")
            out[k] = val
        return out

    def crate_types(self) -> list[str]:
        types = [t for v in self.values("--crate-type") for t in v.split(",") if t]
        if not types and self.has("--test"):
            return ["bin"]  # a test harness is linked like a bin
        return types

    def emits(self) -> list[str]:
        return [e for v in self.values("--emit") for e in v.split(",") if e]

    @property
    def crate_name(self) -> str | None:
        return self.value("--crate-name")


def non_compilation_reason(inv: Invocation) -> str | None:
    if not inv.args:
        return "no-args"
    if any(a in ("-vV", "-V", "--version") for a in inv.args):
        return "version"
    if inv.has("--print"):
        return "print"
    if inv.has("--explain") or inv.has("--help") or inv.has("-h"):
        return "help"
    return None


def non_cacheable_reason(inv: Invocation) -> str | None:
    """Why this compilation cannot be cached, or None when it can."""
    if inv.bad:
        return inv.bad
    if os.path.basename(inv.rustc).split(".")[0] != "rustc":
        return "not-rustc"  # e.g. a nested RUSTC_WORKSPACE_WRAPPER such as clippy-driver
    if "-" in inv.inputs:
        return "stdin"
    if len(inv.inputs) != 1:
        return "inputs"
    cg = inv.codegen()
    if "incremental" in cg:
        return "incremental"
    if not inv.crate_name:
        return "no-crate-name"
    if not cg.get("extra-filename") and not cg.get("metadata"):
        # cargo names every unit by one of them; its new build-dir layout gives bins and test
        # harnesses a directory of their own and only `-C metadata`
        return "no-extra-filename"
    if not inv.value("--out-dir"):
        return "no-out-dir"
    if inv.has("-o"):
        return "output-file"
    if inv.has("--sysroot"):
        return "sysroot"
    types = inv.crate_types()
    if not types:
        return "crate-type:none"
    for t in types:
        if t not in _CACHEABLE_CRATE_TYPES:
            return f"crate-type:{t}"
    emits = inv.emits()
    if not any(e in ("metadata", "link") for e in emits):
        return "emit:none"
    for e in emits:
        if "=" in e:
            return "emit-path"
        if e not in _CACHEABLE_EMITS:
            return f"emit:{e}"
    if cg.get("split-debuginfo", "off") != "off":
        return "split-debuginfo"
    if "save-temps" in cg or "profile-use" in cg or "profile-generate" in cg:
        return "codegen-option"
    if links_natively(types, emits):
        return linked_output_reason(inv, cg)
    return None


def links_natively(types: list[str], emits: list[str]) -> bool:
    return "link" in emits and any(t in ("bin", "proc-macro") for t in types)


def linked_output_reason(inv: Invocation, cg: dict[str, str]) -> str | None:
    """Bins, build scripts and proc-macros are linked by the system linker.  The cache key
    covers the linker and the system libraries it links by content, so extra linker input
    that the key cannot see makes the call non-cacheable."""
    if any(k in cg for k in ("link-arg", "link-args", "linker-flavor", "link-self-contained", "linker-plugin-lto")):
        return "link-args"
    for spec in inv.values("-l"):
        kind = spec.split("=", 1)[0] if "=" in spec else "dylib"
        if not kind.startswith("static"):
            return "link-dylib"
    return None  # cross linking is refused in cache_key, which knows the host triple


def log_event(result: str, inv: Invocation | None, detail: str = "") -> None:
    path = os.environ.get("RSNAP_WRAPPER_LOG")
    if not path:
        return
    crate = (inv.crate_name if inv else None) or "-"
    kinds = ",".join(inv.crate_types()) if inv else "-"
    line = f"{result} {crate} {kinds or '-'} {detail or '-'}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def exec_rustc(rustc: str, args: list[str]) -> None:  # never returns: execs rustc
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(rustc, [rustc, *args])
    except OSError as e:
        sys.stderr.write(f"rsnap-rustc: cannot run {rustc}: {e.strerror}\n")
        sys.exit(127)
