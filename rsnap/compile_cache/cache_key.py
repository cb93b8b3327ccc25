"""The compile cache's key: toolchain and link-environment digests, the checkout roots and
their tokens, the tokenized arguments, and every file rustc reads (design: rsnap.compile_cache.cache)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import xxhash

from ..digest import hash_file
from . import stats as wrapper_stats
from .rustc_call import Invocation, links_natively

KEY_VERSION = "rsnap-rustc-1"
MIN_ROOT_LEN = 6          # shorter "roots" (/, /tmp) would match unrelated bytes

_ENV_EXCLUDED_PREFIXES = (
    "CARGO_MAKEFLAGS", "CARGO_BUILD_", "CARGO_REGISTRIES_", "CARGO_REGISTRY_", "CARGO_HTTP_",
    "CARGO_NET_", "CARGO_TERM_", "CARGO_PROFILE_", "CARGO_TARGET_", "CARGO_INCREMENTAL",
    "CARGO_CACHE_", "CARGO_LOG", "CARGO_UNSTABLE_", "CARGO_ALIAS_", "CARGO_SOURCE_",
    "CARGO_ENCODED_RUSTFLAGS", "CARGO_FUTURE_INCOMPAT_", "CARGO_RESOLVER_", "CARGO_INSTALL_",
)
_ENV_EXTRA = ("OUT_DIR", "RUSTC_BOOTSTRAP", "RUST_TARGET_PATH", "LIBRARY_PATH")
_KEY_DROPPED_FLAGS = ("--diagnostic-width", "--color")
# Start files and libraries the system linker adds to every bin and proc-macro.
_SYSTEM_LINK_FILES = (
    "crt1.o", "Scrt1.o", "crti.o", "crtn.o", "crtbegin.o", "crtend.o", "crtbeginS.o",
    "crtendS.o", "libc.so", "libc.so.6", "libc_nonshared.a", "libm.so.6", "libgcc.a",
    "libgcc_s.so", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
    "libutil.so.1", "ld-linux-x86-64.so.2",
)


class Phases:
    """Wall time per phase of one call, appended to RSNAP_WRAPPER_LOG lines."""

    def __init__(self):
        self.t = time.monotonic()
        self.times: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now

    def __str__(self) -> str:
        return ",".join(f"{k}={v:.3f}" for k, v in self.times.items())


PHASES = Phases()


class Uncacheable(Exception):
    """Raised while preparing the key: the call is compiled plainly, counted with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CorruptEntry(Exception):
    pass


def hash_strings(parts) -> str:
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def _stat_id(path: str) -> str:
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _stat_ids(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(_stat_id(p))
        except OSError:
            out.append(f"{p}|absent")
    return out


def _digest_cache(kind: str, ident: str, compute) -> dict:
    """A small JSON file per (kind, ident) in the state dir, so toolchain-wide digests
    are computed once per runner instead of once per rustc call.  A value listing the
    `files` it hashed is recomputed when one of them changed (size, mtime, inode)."""
    d = os.path.join(wrapper_stats.state_dir(), kind)
    path = os.path.join(d, hash_strings([ident]) + ".json")
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("ident") == ident and cached.get("stats") == _stat_ids(cached.get("files", [])):
            return cached
    except (OSError, ValueError):
        pass
    value = compute()
    value["ident"] = ident
    value["stats"] = _stat_ids(value.get("files", []))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def _run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def toolchain_info(rustc: str) -> dict:
    """{digest, sysroot, host} of the rustc binary cargo handed us."""
    real = os.path.realpath(rustc)
    guessed_sysroot = os.path.dirname(os.path.dirname(real))
    if os.path.isdir(os.path.join(guessed_sysroot, "lib", "rustlib")):
        ident = _stat_id(real)
    else:  # a proxy (rustup shim, wrapper script): its stat says nothing about the toolchain
        sysroot = _run([rustc, "--print", "sysroot"]).strip()
        ident = _stat_id(real) + "|" + _stat_id(os.path.join(sysroot, "bin", "rustc"))
    return _digest_cache("toolchains", ident, lambda: _compute_toolchain(rustc))


def _compute_toolchain(rustc: str) -> dict:
    version = _run([rustc, "-vV"])
    sysroot = _run([rustc, "--print", "sysroot"]).strip()
    host = next((line.split(":", 1)[1].strip() for line in version.splitlines() if line.startswith("host:")), "")
    parts = [version]
    lib = os.path.join(sysroot, "lib")
    for name in sorted(os.listdir(lib)):
        path = os.path.join(lib, name)
        if ".so" in name and os.path.isfile(path):
            parts += [name, hash_file(path)]
    return {"digest": hash_strings(parts), "sysroot": os.path.realpath(sysroot), "host": host}


def link_env_digest(inv: Invocation, toolchain: dict) -> str:
    linker = inv.codegen().get("linker") or "cc"
    resolved = shutil.which(linker)
    if not resolved:
        raise Uncacheable("linker-not-found")
    real = os.path.realpath(resolved)
    ident = f"{_stat_id(real)}|{toolchain['digest']}"
    return _digest_cache("linkers", ident, lambda: _compute_link_env(resolved, toolchain))["digest"]


def _compute_link_env(linker: str, toolchain: dict) -> dict:
    files = {"linker": os.path.realpath(linker)}
    ld = _run([linker, "-print-prog-name=ld"]).strip()
    ld = ld if os.path.isabs(ld) else shutil.which(ld)
    if ld:
        files["ld"] = os.path.realpath(ld)
    for name in _SYSTEM_LINK_FILES:
        found = _run([linker, f"-print-file-name={name}"]).strip()
        if os.path.isabs(found) and os.path.isfile(found):
            files[name] = os.path.realpath(found)
    rustlib_bin = os.path.join(toolchain["sysroot"], "lib", "rustlib", toolchain["host"], "bin")
    for dirpath, _dirs, names in sorted(os.walk(rustlib_bin)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, rustlib_bin)] = os.path.realpath(path)
    parts = [f"{label}={hash_file(path)}" for label, path in sorted(files.items())]
    return {"digest": hash_strings(parts), "files": sorted(set(files.values()))}


class Roots:
    """Real paths of this checkout/runner, the tokens they become in keys and stored
    text, and the `--remap-path-prefix` flags that keep them out of binary outputs."""

    def __init__(self, inv: Invocation, toolchain: dict):
        env = os.environ
        cwd = os.getcwd()
        out_dir = os.path.abspath(inv.value("--out-dir"))
        entries = [("TARGET", target_root(out_dir, inv.value("--target")), "/rsnap/target"),
                   ("CARGO_HOME", env.get("CARGO_HOME"), "/rsnap/cargo-home"),
                   ("CWD", cwd, "."),
                   ("SYSROOT", toolchain["sysroot"], None)]
        manifest = env.get("CARGO_MANIFEST_DIR")
        source_is_absolute = os.path.isabs(inv.inputs[0])
        if manifest and source_is_absolute:
            # registry, git or out-of-workspace path crate: named like cargo's trim-paths
            pkg = f"{env.get('CARGO_PKG_NAME', inv.crate_name)}-{env.get('CARGO_PKG_VERSION', '0')}"
            entries.append(("PKG", manifest, pkg))
        self.entries = [(tok, os.path.normpath(path), remap) for tok, path, remap in entries
                        if path and len(os.path.normpath(path)) >= MIN_ROOT_LEN]
        # longest first so a root inside another (target inside the workspace) wins
        self.by_length = sorted(self.entries, key=lambda e: (-len(e[1]), e[0]))

    def tokenize(self, text: str) -> str:
        for tok, path, _ in self.by_length:
            if path in text:
                text = text.replace(path, f"@RSNAP:{tok}@")
        return text

    def tokenize_bytes(self, data: bytes) -> bytes:
        for tok, path, _ in self.by_length:
            p = path.encode()
            if p in data:
                data = data.replace(p, f"@RSNAP:{tok}@".encode())
        return data

    def detokenize(self, text: str) -> str:
        for tok, path, _ in self.entries:
            text = text.replace(f"@RSNAP:{tok}@", path)
        if "@RSNAP:" in text:
            raise CorruptEntry("stored path names a root this runner does not have")
        return text

    def detokenize_bytes(self, data: bytes) -> bytes:
        for tok, path, _ in self.entries:
            data = data.replace(f"@RSNAP:{tok}@".encode(), path.encode())
        if b"@RSNAP:" in data:
            raise CorruptEntry("stored text names a root this runner does not have")
        return data

    def remap_args(self) -> list[str]:
        # rustc applies the last matching --remap-path-prefix: most specific last,
        # and the package root after the cwd it may be equal to.
        order = sorted((e for e in self.entries if e[2] is not None),
                       key=lambda e: (len(e[1]), e[0] == "PKG"))
        return [f"--remap-path-prefix={path}={remap}" for _tok, path, remap in order]

    def embedded_in(self, data: bytes) -> str | None:
        for tok, path in self.scan_roots():
            if path in data:
                return tok
        return None

    def scan_roots(self) -> list[tuple[str, bytes]]:
        # a root inside another root can only occur where the outer one does
        paths = sorted({path for _tok, path, _ in self.entries}, key=len)
        outer = [p for i, p in enumerate(paths) if not any(p.startswith(q + os.sep) or p == q for q in paths[:i])]
        return [(tok, path.encode()) for tok, path, _ in self.entries if path in outer]

    def real_paths(self) -> list[str]:
        return [f"{tok}={path}" for tok, path, _ in sorted(self.entries)]


def target_root(out_dir: str, target: str | None) -> str | None:
    """`<target>/[<triple>/]<profile>/{deps,build/<unit>,examples}` -> `<target>`."""
    parts = out_dir.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("deps", "build", "examples", "incremental"):
            root = parts[: i - 1]  # drop the profile directory
            triple = os.path.basename(target)[:-5] if target and target.endswith(".json") else target
            if triple and root and root[-1] == triple:
                root = root[:-1]
            return os.sep.join(root) or None
    return None


class Prepared:
    """Everything known before the dep-info pass; `key` is set once the inputs are known."""

    def __init__(self, inv, toolchain, roots, base_key, linked, outputs):
        self.inv = inv
        self.toolchain = toolchain
        self.roots = roots
        self.base_key = base_key  # args, env, toolchain, native libs: not the files read
        self.key = None
        self.inputs = None  # (files, env var names) from the dep-info pass
        self.linked = linked
        self.outputs = outputs  # file names rustc will write into --out-dir

    def path_key(self) -> str:
        return hash_strings([self.key, *self.roots.real_paths()])

    def full_key(self, files: list[str], env_names: list[str]) -> str:
        """The key from the files and env vars rustc reads (dep-info or a manifest)."""
        parts = [self.base_key, "files"]
        for path in files:
            parts += file_for_key(path, self.toolchain, self.roots, self.linked)
        parts.append("env-deps")
        for name in env_names:
            value = os.environ.get(name)
            parts.append(self.roots.tokenize(name if value is None else f"{name}={value}"))
        return hash_strings(parts)


def expected_outputs(inv: Invocation) -> list[str]:
    name = inv.crate_name + inv.codegen().get("extra-filename", "")
    emits = inv.emits()
    outs = []
    if "dep-info" in emits:
        outs.append(f"{name}.d")
    if "metadata" in emits:
        outs.append(f"lib{name}.rmeta")
    if "link" in emits:
        for t in inv.crate_types():
            outs.append({"lib": f"lib{name}.rlib", "rlib": f"lib{name}.rlib", "staticlib": f"lib{name}.a",
                         "proc-macro": f"lib{name}.so", "bin": name}[t])
    return sorted(set(outs))


def prepare(inv: Invocation) -> Prepared:
    toolchain = toolchain_info(inv.rustc)
    PHASES.mark("toolchain")
    linked = links_natively(inv.crate_types(), inv.emits())
    target = inv.value("--target")
    if (linked or "staticlib" in inv.crate_types()) and target and os.path.basename(target) != toolchain["host"]:
        raise Uncacheable("cross-link")  # output names and linkers of other platforms
    roots = Roots(inv, toolchain)
    parts = [KEY_VERSION, "toolchain", toolchain["digest"]]
    if linked:
        parts += ["link-env", link_env_digest(inv, toolchain)]
    parts.append("args")
    for flag, value in inv.options:
        if flag not in _KEY_DROPPED_FLAGS:
            parts += [flag, roots.tokenize(value) if value is not None else "\x01"]
    parts += ["input", roots.tokenize(os.path.abspath(inv.inputs[0]))]
    parts += ["env", *env_for_key(roots)]
    parts += ["native", *native_inputs(inv, roots)]
    if target and target.endswith(".json"):
        parts += ["target-spec", hash_file(target)]
    cg = inv.codegen()
    if "native" in cg.get("target-cpu", "") or "native" in cg.get("target-feature", ""):
        parts += ["host-cpu", host_cpu()]  # the same flags mean other code on another CPU
    PHASES.mark("key-args")
    return Prepared(inv, toolchain, roots, hash_strings(parts), linked, expected_outputs(inv))


def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().split("\n\n")[0].splitlines()
                     if line.startswith(("vendor_id", "cpu family", "model", "flags"))]
        return "\n".join(lines)
    except OSError:
        raise Uncacheable("target-cpu-native") from None


def env_for_key(roots: Roots) -> list[str]:
    out = []
    for name in sorted(os.environ):
        if name in _ENV_EXTRA or (name.startswith("CARGO") and not name.startswith(_ENV_EXCLUDED_PREFIXES)):
            out.append(f"{name}={roots.tokenize(os.environ[name])}")
    return out


def file_for_key(path: str, toolchain: dict, roots: Roots, linked: bool) -> list[str]:
    absolute = os.path.abspath(path)
    if absolute.startswith(toolchain["sysroot"] + os.sep) or os.path.realpath(absolute).startswith(toolchain["sysroot"] + os.sep):
        return []  # covered by the toolchain digest
    if linked and absolute.endswith(".rmeta"):
        rlib = absolute[:-6] + ".rlib"
        if os.path.isfile(rlib):
            absolute = rlib
    try:
        digest = hash_file(absolute)
    except OSError:
        raise Uncacheable("input-unreadable") from None
    return [roots.tokenize(path), digest]


def depinfo_pass(inv: Invocation) -> tuple[list[str], list[str]]:
    """Ask rustc which files and env vars this compilation reads (`--emit=dep-info`)."""
    skip = {"--emit", "--out-dir", "-o", "--json", "--error-format", "--color", "--diagnostic-width"}
    args = []
    for flag, value in inv.options:
        if flag in skip or (flag in ("-C", "--codegen") and value and value.startswith("incremental=")):
            continue
        args += [flag] if value is None else [flag, value]
    with tempfile.TemporaryDirectory(prefix="rsnap-depinfo-") as tmp:
        dep_file = os.path.join(tmp, "deps.d")
        cmd = [inv.rustc, *args, *inv.inputs, "--emit", f"dep-info={dep_file}", "-Z", "binary-dep-depinfo"]
        # binary-dep-depinfo is unstable; it only serves the key, never the real compile
        env = dict(os.environ, RUSTC_BOOTSTRAP="1")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False)
        if proc.returncode != 0 or not os.path.isfile(dep_file):
            raise Uncacheable("depinfo-failed")
        with open(dep_file, encoding="utf-8", errors="surrogateescape") as f:
            return parse_depinfo(f.read())


def parse_depinfo(text: str) -> tuple[list[str], list[str]]:
    lines = text.splitlines()
    files: list[str] = []
    if lines:
        _target, _, deps = lines[0].partition(": ")
        files = [p.replace("\0", " ") for p in deps.replace("\\ ", "\0").split()]
    env_deps = [line[len("# env-dep:"):] for line in lines if line.startswith("# env-dep:")]
    return files, env_deps


def env_dep_names(env_deps: list[str]) -> list[str]:
    """Names only: the key takes the values from the environment (what rustc saw),
    the same way for the dep-info pass and for a manifest."""
    return sorted({e.split("=", 1)[0] for e in env_deps})


def native_search_dirs(inv: Invocation) -> list[str]:
    """`-L [KIND=]PATH` directories where rustc looks for native libraries."""
    dirs = []
    for value in inv.values("-L"):
        kind, sep, path = value.partition("=")
        if not sep:
            dirs.append(value)
        elif kind in ("native", "all", "framework"):
            dirs.append(path)
    return dirs


def native_inputs(inv: Invocation, roots: Roots) -> list[str]:
    """Static native libraries get bundled into rlibs and linked into bins: hash them."""
    search = native_search_dirs(inv)
    out = []
    for spec in inv.values("-l"):
        kind, _, name = spec.rpartition("=")
        if not kind.startswith("static"):
            continue
        name = name.split(":", 1)[0]
        found = next((os.path.join(d, f"lib{name}.a") for d in search if os.path.isfile(os.path.join(d, f"lib{name}.a"))), None)
        out += [spec, roots.tokenize(found) if found else "absent", hash_file(found) if found else ""]
    return out
