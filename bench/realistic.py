"""A realistic Rust workspace for benchmarks, built from real crates.

The crates come from Debian's ``librust-*-dev`` packages (installed with apt if
missing), which put unpacked crates under ``/usr/share/cargo/registry``. They are
packed into ``.crate`` files plus a sparse index (reusing the test fixtures'
``fixtures/tools/mkregistry.py``) and served over HTTP on 127.0.0.1, so cargo
fills ``$CARGO_HOME/registry`` by itself, exactly as with crates.io.

The workspace has six members (a lib chain, a proc-macro and a bin) that depend
on serde/serde_json, regex, clap (derive), anyhow, thiserror, itertools, rand,
log, memchr, smallvec, bytes, once_cell, syn/quote/proc-macro2, env_logger, rayon,
flate2, indexmap, petgraph, parking_lot and tracing: ~60 packages, ~100 units, a clean
debug build of 30-50 s on 2 cores.

Layout under ``root``::

    registry/      crates staged from Debian, then dl/ and index/ of the registry
    cargo-home/    CARGO_HOME with crates.io replaced by the loopback registry
    origin/        git repo of the workspace (what CI would clone)
    ws/            the checkout that gets built (``git clone origin ws``)

Script use::

    python bench/realistic.py ROOT            # set up, fetch, print paths; then serve until Ctrl-C
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fixtures.tools import cargohome, mkregistry  # noqa: E402
from fixtures.tools.common import cargo_env, git, run  # noqa: E402

DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
DEBIAN_PACKAGES = [
    "librust-serde-dev", "librust-serde-derive-dev", "librust-serde-json-dev",
    "librust-regex-dev", "librust-clap-dev", "librust-anyhow-dev", "librust-thiserror-dev",
    "librust-itertools-dev", "librust-rand-dev", "librust-log-dev", "librust-memchr-dev",
    "librust-smallvec-dev", "librust-bytes-dev", "librust-once-cell-dev",
    "librust-syn-dev", "librust-quote-dev", "librust-proc-macro2-dev",
    "librust-env-logger-dev", "librust-rayon-dev", "librust-flate2-dev", "librust-indexmap-dev",
    "librust-petgraph-dev", "librust-parking-lot-dev", "librust-tracing-dev",
    "librust-humantime-dev",  # env_logger's default features; not pulled in with --no-install-recommends
    "librust-regex+default-dev",  # regex's default features (aho-corasick): likewise
]
# Crate dir names (without version) that must exist after the install.
REQUIRED_CRATES = ["serde", "serde_derive", "serde_json", "regex", "clap", "clap_derive",
                   "anyhow", "thiserror", "itertools", "rand", "log", "memchr", "smallvec",
                   "bytes", "once_cell", "syn", "quote", "proc-macro2", "env_logger", "rayon", "flate2",
                   "indexmap", "petgraph", "parking_lot", "tracing", "humantime", "aho-corasick"]
# Left out of the .crate files: Debian's packaging dir and its placeholder checksum.
DROPPED_FROM_CRATES = (".cargo-checksum.json", "debian")

LEAF_CRATE = "crates/app"           # the bin nobody depends on: where edits go
LEAF_FILE = f"{LEAF_CRATE}/src/main.rs"
EDIT_MARKER = "const BUILD_TAG: u32 = "
CODE_EDIT_MARKER = "// rsnap bench code edit"


# ---------------------------------------------------------------- Debian crates

def debian_crate_dirs() -> list[Path]:
    if not DEBIAN_REGISTRY.is_dir():
        return []
    return sorted(p for p in DEBIAN_REGISTRY.iterdir() if (p / "Cargo.toml").is_file())


def missing_crates() -> list[str]:
    have = {p.name.rsplit("-", 1)[0] for p in debian_crate_dirs()}
    return [name for name in REQUIRED_CRATES if name not in have]


def apt_install(packages: list[str]) -> None:
    """apt-get install ``packages``; runs apt-get update first only if the install fails."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(install, env=env)


def ensure_debian_crates() -> None:
    """apt-get install the librust-*-dev packages unless their crates are already there."""
    if not missing_crates():
        return
    apt_install(DEBIAN_PACKAGES)
    if missing_crates():
        raise RuntimeError(f"crates still missing after apt-get install: {missing_crates()}")


def stage_crates(dest: Path) -> list[Path]:
    """Copy every Debian crate dir to ``dest`` without Debian's extra files."""
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for src in debian_crate_dirs():
        out = dest / src.name
        if not out.exists():
            shutil.copytree(src, out, symlinks=False, ignore=shutil.ignore_patterns(*DROPPED_FROM_CRATES))
        staged.append(out)
    return staged


def build_local_registry(root: Path) -> Path:
    """Stage the Debian crates and write ``root/dl`` and ``root/index``."""
    crate_dirs = stage_crates(root / "src")
    return mkregistry.build_registry(crate_dirs, root)


# ---------------------------------------------------------------- workspace source

WORKSPACE_TOML = """\
[workspace]
resolver = "2"
members = ["crates/*"]

[workspace.package]
version = "0.1.0"
edition = "2021"
"""


def member_toml(name: str, deps: dict[str, str], kind: str = "lib") -> str:
    lines = ["[package]", f'name = "{name}"', "version.workspace = true", "edition.workspace = true", ""]
    if kind == "proc-macro":
        lines += ["[lib]", "proc-macro = true", ""]
    lines += ["[dependencies]"] + [f"{dep} = {spec}" for dep, spec in deps.items()]
    return "\n".join(lines) + "\n"


def core_src(n: int = 160) -> str:
    """Many serde-derived records: a few seconds of real codegen."""
    parts = ["use serde::{Deserialize, Serialize};", "",
             "#[derive(Debug, thiserror::Error)]",
             "pub enum CoreError {",
             '    #[error("bad json: {0}")] Json(#[from] serde_json::Error),',
             '    #[error("empty input")] Empty,',
             "}", ""]
    for i in range(n):
        parts += ["#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]",
                  f"pub struct Record{i} {{ pub id: u64, pub name: String, pub tags: Vec<String>, "
                  f"pub score: f64, pub parent: Option<u64> }}", "",
                  f"impl Record{i} {{",
                  "    pub fn roundtrip(&self) -> Result<Self, CoreError> {",
                  "        Ok(serde_json::from_str(&serde_json::to_string(self)?)?)",
                  "    }", "}", ""]
    parts += ["pub fn parse_records(text: &str) -> Result<Vec<Record0>, CoreError> {",
              "    if text.trim().is_empty() { return Err(CoreError::Empty); }",
              "    Ok(serde_json::from_str(text)?)", "}"]
    return "\n".join(parts) + "\n"


MACROS_SRC = """\
use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields};

/// Derives `fn describe(&self) -> String` listing the struct's field names.
#[proc_macro_derive(Describe)]
pub fn derive_describe(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let name = &input.ident;
    let fields: Vec<String> = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(named) => named.named.iter().map(|f| f.ident.as_ref().unwrap().to_string()).collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let text = format!("{}{{{}}}", name, fields.join(","));
    let expanded = quote! {
        impl #name {
            pub fn describe(&self) -> String { #text.to_string() }
        }
    };
    TokenStream::from(expanded)
}
"""


def text_src(n: int = 120) -> str:
    parts = ["use itertools::Itertools;", "use once_cell::sync::Lazy;", "use regex::Regex;", "",
             r'static WORD: Lazy<Regex> = Lazy::new(|| Regex::new(r"[A-Za-z][A-Za-z0-9_]*").unwrap());', "",
             "pub fn words(text: &str) -> Vec<String> {",
             "    WORD.find_iter(text).map(|m| m.as_str().to_lowercase()).collect()", "}", "",
             "pub fn line_count(text: &str) -> usize { memchr::memchr_iter(b'\\n', text.as_bytes()).count() }", "",
             "pub fn top_words(text: &str, k: usize) -> Vec<(String, usize)> {",
             "    words(text).into_iter().counts().into_iter()",
             "        .sorted_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0))).take(k).collect()", "}", ""]
    for i in range(n):
        parts += [f"pub fn rule{i}(text: &str) -> Vec<core_types::Record{i % 160}> {{",
                  f"    words(text).into_iter().enumerate().filter(|(j, _)| j % {i + 2} == 0)",
                  f"        .map(|(j, w)| core_types::Record{i % 160} {{ id: j as u64, name: w.clone(), "
                  f"tags: vec![w], score: {i}.0, parent: None }}).collect()", "}", ""]
    return "\n".join(parts) + "\n"


def model_src(n: int = 120) -> str:
    parts = ["use bytes::{BufMut, BytesMut};", "use rand::{Rng, SeedableRng};", "use smallvec::SmallVec;",
             "use derive_macros::Describe;", ""]
    for i in range(n):
        parts += ["#[derive(Debug, Clone, Describe)]",
                  f"pub struct Sample{i} {{ pub values: SmallVec<[u32; 8]>, pub label: String }}", "",
                  f"pub fn sample{i}(seed: u64) -> Sample{i} {{",
                  "    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);",
                  f"    let values = (0..{i + 4}).map(|_| rng.gen_range(0..1000)).collect();",
                  f"    Sample{i} {{ values, label: text_tools::words(\"sample {i}\").join(\"-\") }}", "}", ""]
    parts += ["pub fn graph(words: &[String]) -> (usize, usize) {",
              "    let mut ids: indexmap::IndexMap<&str, petgraph::graph::NodeIndex> = indexmap::IndexMap::new();",
              "    let mut g = petgraph::Graph::<&str, ()>::new();",
              "    for w in words { let n = g.add_node(w.as_str()); ids.entry(w.as_str()).or_insert(n); }",
              "    for pair in words.windows(2) { g.add_edge(ids[pair[0].as_str()], ids[pair[1].as_str()], ()); }",
              "    (g.node_count(), petgraph::algo::kosaraju_scc(&g).len())", "}", "",
              "pub static SEEN: parking_lot::Mutex<Vec<u64>> = parking_lot::const_mutex(Vec::new());", "",
              "pub fn encode(values: &[u32]) -> BytesMut {",
              "    let mut buf = BytesMut::with_capacity(values.len() * 4);",
              "    for v in values { buf.put_u32(*v); }", "    buf", "}", "",
              "pub fn describe_all(seed: u64) -> Vec<String> {",
              "    vec![" + ", ".join(f"sample{i}(seed).describe()" for i in range(n)) + "]", "}"]
    return "\n".join(parts) + "\n"


REPORT_SRC = """\
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::io::Write;

pub struct Report { pub lines: usize, pub top: Vec<(String, usize)>, pub shapes: Vec<String>, pub checksum: u64 }

pub fn build(text: &str, seed: u64) -> Result<Report> {
    log::debug!("building report for {} bytes", text.len());
    let _span = tracing::info_span!("report", seed).entered();
    let (nodes, sccs) = model::graph(&text_tools::words(text));
    tracing::info!(nodes, sccs, "graph");
    model::SEEN.lock().push(seed);
    let top = text_tools::top_words(text, 5);
    let shapes = model::describe_all(seed);
    let sample = model::sample3(seed);
    let encoded = model::encode(&sample.values);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&encoded)?;
    let packed = gz.finish()?;
    let checksum = packed.par_iter().map(|b| *b as u64).sum::<u64>()
        ^ encoded.iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(*b as u64));
    let rec = core_types::Record1 { id: 1, name: "r".into(), tags: vec![], score: 1.0, parent: None };
    rec.roundtrip().context("record roundtrip")?;
    Ok(Report { lines: text_tools::line_count(text), top, shapes, checksum })
}

pub fn to_json(report: &Report) -> String {
    serde_json::json!({
        "lines": report.lines,
        "top": report.top,
        "shapes": report.shapes.len(),
        "checksum": report.checksum,
    }).to_string()
}
"""

APP_SRC = """\
use clap::Parser;

const BUILD_TAG: u32 = 0;

/// Summarize a text file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Input file (default: built-in text)
    input: Option<std::path::PathBuf>,
    /// Random seed
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    env_logger::init();
    let args = Args::parse();
    let text = match &args.input {
        Some(path) => std::fs::read_to_string(path)?,
        None => "the quick brown fox\\njumps over the lazy dog\\nthe end\\n".to_string(),
    };
    let report = report::build(&text, args.seed)?;
    if args.json {
        println!("{}", report::to_json(&report));
    } else {
        println!("tag {} lines {} top {:?} checksum {}", BUILD_TAG, report.lines, report.top, report.checksum);
    }
    Ok(())
}
"""


def workspace_files() -> dict[str, str]:
    """Relative path -> content of every file of the workspace."""
    path = lambda name: f'{{ path = "../{name}" }}'  # noqa: E731
    files = {
        "Cargo.toml": WORKSPACE_TOML,
        ".gitignore": "/target\n",
        "crates/core_types/Cargo.toml": member_toml("core_types", {
            "serde": '{ version = "1", features = ["derive"] }', "serde_json": '"1"', "thiserror": '"1"'}),
        "crates/core_types/src/lib.rs": core_src(),
        "crates/derive_macros/Cargo.toml": member_toml("derive_macros", {
            "syn": '{ version = "1", features = ["full"] }', "quote": '"1"', "proc-macro2": '"1"'},
            kind="proc-macro"),
        "crates/derive_macros/src/lib.rs": MACROS_SRC,
        "crates/text_tools/Cargo.toml": member_toml("text_tools", {
            "core_types": path("core_types"), "regex": '"1"', "memchr": '"2"', "itertools": '"0.10"',
            "once_cell": '"1"'}),
        "crates/text_tools/src/lib.rs": text_src(),
        "crates/model/Cargo.toml": member_toml("model", {
            "text_tools": path("text_tools"), "derive_macros": path("derive_macros"), "rand": '"0.8"',
            "smallvec": '"1"', "bytes": '"1"', "indexmap": '"1"', "petgraph": '"0.6"',
            "parking_lot": '"0.12"'}),
        "crates/model/src/lib.rs": model_src(),
        "crates/report/Cargo.toml": member_toml("report", {
            "model": path("model"), "text_tools": path("text_tools"), "core_types": path("core_types"),
            "anyhow": '"1"', "log": '"0.4"', "serde_json": '"1"', "rayon": '"1"', "flate2": '"1"',
            "tracing": '"0.1"'}),
        "crates/report/src/lib.rs": REPORT_SRC,
        "crates/app/Cargo.toml": member_toml("app", {
            "report": path("report"), "clap": '{ version = "4", features = ["derive"] }', "anyhow": '"1"',
            "env_logger": '"0.9"'},
            kind="bin"),
        "crates/app/src/main.rs": APP_SRC,
    }
    return files


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ---------------------------------------------------------------- the whole setup

@dataclass
class Realistic:
    root: Path
    origin: Path
    ws: Path
    cargo_home: Path
    server: mkregistry.RegistryServer
    extra_env: dict[str, str] = field(default_factory=dict)
    edit_kind: str = "const"

    @property
    def env(self) -> dict[str, str]:
        """Environment for cargo and rsnap: CARGO_HOME set, cargo-affecting variables stripped."""
        return cargo_env(self.cargo_home, **self.extra_env)

    @property
    def target(self) -> Path:
        return self.ws / "target"

    def fresh_clone(self) -> None:
        """Replace ``ws`` (and its target dir) with a new clone of ``origin``: new mtimes."""
        retire(self.ws, self.root)
        git("clone", "-q", str(self.origin), str(self.ws))

    def edit_leaf(self, tag: int) -> None:
        """One-line change in the leaf bin crate: the value of a constant (edit_kind "const"), or
        with edit_kind "code", one more statement in main() than the tag before (code moves)."""
        path = self.ws / LEAF_FILE
        lines = [f"{EDIT_MARKER}{tag};" if line.startswith(EDIT_MARKER) else line
                 for line in path.read_text().splitlines() if not line.endswith(CODE_EDIT_MARKER)]
        if self.edit_kind == "code":
            at = lines.index("    env_logger::init();") + 1
            lines[at:at] = [f'    if std::env::var_os("RSNAP_BENCH_{i}").is_some() {{ eprintln!("bench edit {i}"); }} '
                            f'{CODE_EDIT_MARKER}' for i in range(1, tag + 1)]
        path.write_text("\n".join(lines) + "\n")

    def stop(self) -> None:
        self.server.stop()
        empty_trash(self.root)


def retire(path: Path, root: Path) -> None:
    """Move ``path`` into ``root/trash`` instead of deleting it now.

    On this machine's ext4 (no journal), creating files within minutes of deleting many
    costs far more kernel time (the allocator skips recently deleted inodes), and how much
    depends on what the previous step deleted. A CI runner's fresh checkout has no such
    debris, so timed steps must not inherit it: the trash is emptied when the run ends."""
    if path.exists():
        trash = root / "trash"
        trash.mkdir(exist_ok=True)
        path.rename(trash / f"{path.name}-{len(list(trash.iterdir()))}")


def empty_trash(root: Path) -> None:
    shutil.rmtree(root / "trash", ignore_errors=True)


def make_origin(origin: Path, env: dict[str, str]) -> None:
    """Write the workspace, lock it against the running registry, commit it."""
    write_files(origin, workspace_files())
    run(["cargo", "generate-lockfile"], cwd=origin, env=env)
    git("init", "-q", cwd=origin)
    git("add", "-A", cwd=origin)
    git("commit", "-q", "-m", "realistic bench workspace", cwd=origin)


def serve_debian_registry(root: Path):
    """Wipe ``root`` (except the staged crates), serve the registry of all Debian crates on
    loopback and make a CARGO_HOME that uses it: (server, cargo_home)."""
    ensure_debian_crates()
    for name in ("cargo-home", "origin", "ws", "trash"):
        shutil.rmtree(root / name, ignore_errors=True)
    server = mkregistry.serve(build_local_registry(root / "registry"))
    return server, cargohome.make_cargo_home(root / "cargo-home", server.index_url)


def setup(root: Path, fetch: bool = True, extra_env: dict[str, str] | None = None) -> Realistic:
    """Create everything under ``root`` (wiped first, except the staged crates) and start the server.

    ``extra_env`` is added to every cargo/rsnap run (e.g. ``CARGO_INCREMENTAL=0``)."""
    root = Path(root).resolve()
    server, cargo_home = serve_debian_registry(root)
    env = cargo_env(cargo_home)
    make_origin(root / "origin", env)
    bench = Realistic(root, root / "origin", root / "ws", cargo_home, server, dict(extra_env or {}))
    bench.fresh_clone()
    if fetch:
        run(["cargo", "fetch"], cwd=bench.ws, env=bench.env)
    return bench


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    bench = setup(Path(argv[0]))
    print(f"workspace   {bench.ws}\nCARGO_HOME  {bench.cargo_home}\nregistry    {bench.server.index_url}")
    print(f"try: cd {bench.ws} && CARGO_HOME={bench.cargo_home} cargo build   (Ctrl-C stops the registry)",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
