"""A small self-made workspace and local registry for the rsnap-rustc tests and bench.

Registry crates (served as a cargo `local-registry`, unpacked into
`$CARGO_HOME/registry/src` like crates.io ones): leaf (generic code, panics, file!()),
mid (depends on leaf), pm (proc-macro), bsdep (build script + OUT_DIR include + cfg).
Workspace: app (bin using everything), util (feature `extra`, option_env!), gen (build
script whose output depends on RSNAP_GEN_VALUE), paths (lib + bin `where` that embed
env!("CARGO_MANIFEST_DIR"), so their output is path-dependent).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REGISTRY_CRATES = {
    ("leaf", "0.1.0"): {
        "deps": [],
        "files": {
            "src/lib.rs": """
pub fn where_am_i() -> &'static str { file!() }
pub fn show<T: std::fmt::Debug>(x: T) -> String {
    let s = format!("{:?}", x);
    if s.len() > 1000 { panic!("too long") }
    s
}
#[inline(never)]
pub fn p(x: u32) -> u32 { if x == 7 { panic!("seven") } x + 1 }
""",
        },
    },
    ("mid", "0.1.0"): {
        "deps": [("leaf", "0.1")],
        "files": {"src/lib.rs": "pub fn twice(x: u32) -> String { leaf::show(x * 2) }\n"},
    },
    ("pm", "0.1.0"): {
        "deps": [],
        "lib_extra": "proc-macro = true\n",
        "files": {
            "src/lib.rs": """
extern crate proc_macro;
use proc_macro::TokenStream;
#[proc_macro]
pub fn answer(_input: TokenStream) -> TokenStream { "42u32".parse().unwrap() }
""",
        },
    },
    ("bsdep", "0.1.0"): {
        "deps": [],
        "build": True,
        "files": {
            "build.rs": """
use std::{env, fs, path::Path};
fn main() {
    let out = env::var("OUT_DIR").unwrap();
    fs::write(Path::new(&out).join("v.rs"), "pub const VALUE: u32 = 7;\\n").unwrap();
    println!("cargo:rustc-cfg=bsdep_built");
    println!("cargo:rerun-if-changed=build.rs");
}
""",
            "src/lib.rs": """
include!(concat!(env!("OUT_DIR"), "/v.rs"));
#[cfg(bsdep_built)]
pub fn built() -> bool { true }
""",
        },
    },
}

WORKSPACE_FILES = {
    "Cargo.toml": """
[workspace]
members = ["app", "util", "gen", "paths"]
resolver = "2"
""",
    "app/Cargo.toml": """
[package]
name = "app"
version = "0.1.0"
edition = "2021"

[dependencies]
util = { path = "../util" }
gen = { path = "../gen" }
mid = "0.1"
pm = "0.1"
bsdep = "0.1"
""",
    "app/src/main.rs": """
fn main() {
    println!("util={}", util::describe());
    println!("gen={} native={}", gen::GENERATED, gen::native());
    println!("mid={}", mid::twice(21));
    println!("pm={}", pm::answer!());
    println!("bsdep={} built={}", bsdep::VALUE, bsdep::built());
}
""",
    "util/Cargo.toml": """
[package]
name = "util"
version = "0.1.0"
edition = "2021"

[features]
extra = []

[dependencies]
leaf = "0.1"
""",
    "util/src/lib.rs": """
pub fn describe() -> String {
    let flavor = option_env!("RSNAP_TEST_FLAVOR").unwrap_or("plain");
    let extra = if cfg!(feature = "extra") { "+extra" } else { "" };
    format!("{}{} leaf={}", flavor, extra, leaf::p(1))
}
""",
    "gen/Cargo.toml": """
[package]
name = "gen"
version = "0.1.0"
edition = "2021"
build = "build.rs"
""",
    "gen/build.rs": """
use std::{env, fs, path::Path, process::Command};
fn main() {
    let value = env::var("RSNAP_GEN_VALUE").unwrap_or_else(|_| "default".to_string());
    let out = env::var("OUT_DIR").unwrap();
    fs::write(Path::new(&out).join("gen.rs"), format!("pub const GENERATED: &str = {:?};\\n", value)).unwrap();
    // a static C library: relative paths, so the archive does not depend on OUT_DIR
    let native = env::var("RSNAP_NATIVE_VALUE").unwrap_or_else(|_| "3".to_string());
    fs::write(Path::new(&out).join("nat.c"), format!("unsigned int native_value(void) {{ return {}; }}\\n", native)).unwrap();
    let _ = fs::remove_file(Path::new(&out).join("libnat.a"));
    assert!(Command::new("cc").current_dir(&out).args(["-c", "-fPIC", "-O1", "nat.c", "-o", "nat.o"]).status().unwrap().success());
    assert!(Command::new("ar").current_dir(&out).args(["crsD", "libnat.a", "nat.o"]).status().unwrap().success());
    println!("cargo:rustc-link-search=native={}", out);
    println!("cargo:rustc-link-lib=static=nat");
    println!("cargo:rerun-if-env-changed=RSNAP_GEN_VALUE");
    println!("cargo:rerun-if-env-changed=RSNAP_NATIVE_VALUE");
    println!("cargo:rerun-if-changed=build.rs");
}
""",
    "gen/src/lib.rs": """
include!(concat!(env!("OUT_DIR"), "/gen.rs"));
extern "C" { fn native_value() -> u32; }
pub fn native() -> u32 { unsafe { native_value() } }
""",
    "paths/Cargo.toml": """
[package]
name = "paths"
version = "0.1.0"
edition = "2021"

[[bin]]
name = "where"
path = "src/main.rs"
""",
    "paths/src/lib.rs": 'pub fn manifest_dir() -> &\'static str { env!("CARGO_MANIFEST_DIR") }\n',
    "paths/src/main.rs": 'fn main() { println!("{}", paths::manifest_dir()); }\n',
}

# Crates of one clean `cargo build` that the wrapper caches (build scripts by crate name).
CACHEABLE_UNITS = {"leaf", "mid", "pm", "bsdep", "util", "gen", "paths", "where", "app",
                   "build_script_build"}


def _index_path(name: str) -> str:
    if len(name) <= 2:
        return f"{len(name)}/{name}"
    if len(name) == 3:
        return f"3/{name[0]}/{name}"
    return f"{name[:2]}/{name[2:4]}/{name}"


def _crate_bytes(name: str, version: str, spec: dict) -> bytes:
    deps = "".join(f'{d} = "{req}"\n' for d, req in spec["deps"])
    toml = f'[package]\nname = "{name}"\nversion = "{version}"\nedition = "2021"\n'
    if spec.get("build"):
        toml += 'build = "build.rs"\n'
    if spec.get("lib_extra"):
        toml += "\n[lib]\n" + spec["lib_extra"]
    toml += "\n[dependencies]\n" + deps
    files = {"Cargo.toml": toml, **spec["files"]}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_registry(root: Path) -> Path:
    """A cargo local-registry with the REGISTRY_CRATES."""
    root.mkdir(parents=True, exist_ok=True)
    for (name, version), spec in REGISTRY_CRATES.items():
        data = _crate_bytes(name, version, spec)
        (root / f"{name}-{version}.crate").write_bytes(data)
        entry = {
            "name": name, "vers": version, "cksum": hashlib.sha256(data).hexdigest(),
            "features": {}, "yanked": False,
            "deps": [{"name": d, "req": f"^{req}", "features": [], "optional": False,
                      "default_features": True, "target": None, "kind": "normal"} for d, req in spec["deps"]],
        }
        index = root / "index" / _index_path(name)
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps(entry) + "\n")
    return root


def make_cargo_home(path: Path, registry: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "rsnap-test-registry"\n\n'
        f'[source.rsnap-test-registry]\nlocal-registry = "{registry}"\n'
    )
    return path


def make_workspace(path: Path) -> Path:
    for rel, text in WORKSPACE_FILES.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text.lstrip("\n"))
    return path


def wrapper_path() -> str:
    """The console script next to this interpreter (a pyenv shim would add ~50 ms a call)."""
    candidate = Path(sys.executable).parent / "rsnap-rustc"
    return str(candidate) if candidate.exists() else shutil.which("rsnap-rustc")


def cargo_env(cargo_home: Path, store: Path, state: Path, log: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CARGO_", "RSNAP_", "RUSTC_WRAPPER", "RUSTFLAGS", "RUSTC_WORKSPACE"))}
    env.update(CARGO_HOME=str(cargo_home), RUSTC_WRAPPER=wrapper_path(), RSNAP_STORE=str(store),
               RSNAP_STATE_DIR=str(state), CARGO_INCREMENTAL="0", CARGO_NET_OFFLINE="true",
               CARGO_TERM_COLOR="never")
    if log:
        env["RSNAP_WRAPPER_LOG"] = str(log)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cargo_build(ws: Path, env: dict, target_dir: Path, *args: str, command: str = "build") -> list[dict]:
    """`cargo build --message-format=json` (or check, ...); returns the JSON messages."""
    cmd = ["cargo", command, "--message-format=json", "--target-dir", str(target_dir), *args]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def read_log(log: Path) -> list[tuple[str, str, str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split(" ", 3)) for line in log.read_text().splitlines()]
