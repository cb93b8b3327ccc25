"""Rust builds in BuildKit after a one-line change: no caching vs cargo-chef-style dependency
layer vs lib/rust-style cache mount on target/ vs rsnap (examples/buildkit/Dockerfile).

    python bench/bench_buildkit.py                       # realistic workspace, dev profile, 1 repeat
    python bench/bench_buildkit.py --repeat 3 --json     # medians of 3; JSON on stdout, table on stderr
    python bench/bench_buildkit.py --fixture --profile release   # the 5-crate path-only fixtures/ws

Workspaces. `--realistic` (the default when Debian's librust-*-dev crates are installed, or can
be as root): bench/realistic.py's six members and ~60 real crates (~75 packages compiled),
served by the loopback sparse registry on 127.0.0.1, which the builds reach because they run
with `--network=host`. The build context carries `.cargo/config.toml` with the `[source]`
replacement of crates.io by that registry (the same config bench/realistic.py puts in its
host CARGO_HOME); it is a workspace-level config rather than one in CARGO_HOME because the
librust and rsnap Dockerfiles put CARGO_HOME on a cache mount, which would hide a config baked
into the image. The one-line change is the leaf bin's constant (`app`: 1 package to rebuild).
`--fixture`: path-only copy of fixtures/ws (5 crates, no registry); the change is in the bottom
crate (`ws-core`, 4 dependents: 5 packages).

Strategies (each a plain Dockerfile, all `FROM` the same base image, see below):
  none    : COPY . . ; cargo build (every build compiles everything);
  chef    : cargo-chef style: a stage COPYs only the manifests, Cargo.lock, .cargo/config.toml
            and stub sources (what `cargo chef prepare` produces) and builds; that layer holds
            the registry dependencies, compiled; a second stage COPYs the sources and builds;
  librust : lib/rust style: COPY . . ; cargo build with cache mounts on target/ and CARGO_HOME;
  rsnap   : examples/buildkit/Dockerfile (cache mounts on target/, CARGO_HOME and the store;
            `rsnap restore && cargo build && rsnap save`; the store seeded from the context and
            its new objects exported, as a CI cache would carry it), minus its `pip install
            rsnap` RUN: rsnap is already in the base image.

For each strategy: `docker builder prune -af`, prime with a build of revision 1; then
  warm  : --repeat times: one-line edit, build (BuildKit cache and cache mounts kept);
  fresh : --repeat times: `docker builder prune -af` (BuildKit layers and every cache mount
          gone; for rsnap the store is kept outside BuildKit: the objects every build exported
          are merged into a host dir that the next build gets in its context as the seed),
          another one-line edit, build.
Every build starts from a fresh copy of the sources (new mtimes, like a fresh clone in CI).
Seconds = wall time of `docker build` (median over the repeats); units = `Compiling` lines
cargo printed (one per package compiled, build-script runs included in its package's line).

What a fresh rsnap build includes: sending the context (sources + the whole seed store, which
BuildKit must transfer again after a prune), `cp -a` of the seed into the empty store cache
mount, `rsnap restore` of target/ and CARGO_HOME's registry, `cargo build` of what changed,
`rsnap save`, and exporting the new store objects to the host (`-o type=local`). Not included:
installing rsnap. The base image `rsnap-bench-bk:<id>` is the tests' `rsnap-rust-test` image
(host toolchain, wheels of this checkout's rsnap and its dependencies built on the host with
`pip wheel`) plus a RUN that pip-installs rsnap into /opt/rsnap; it is a tagged image, so a
prune leaves it, as a CI runner pulls its base image rather than rebuilding it. The JSON and
the notes under the table break the rsnap builds down from BuildKit's own step timings.

Needs what tests/test_buildkit.py needs (.ci/buildkit-setup.sh: dockerd + local images), plus
for --realistic Debian's librust-*-dev crates (apt-get when missing). The machine may be
shared: the 1/5/15-min load averages at start and end are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import buildkit_util as bk  # noqa: E402

STRATEGIES = ("none", "chef", "librust", "rsnap")

NONE = """FROM {img}
WORKDIR /src
COPY . .
RUN cargo {cargo_args} && mkdir -p /out/bin && cp target/{profile_dir}/app /out/bin/
FROM scratch
COPY --from=0 /out /
"""

CHEF = """FROM {img} AS deps
WORKDIR /src
COPY chef-recipe/ ./
RUN cargo {cargo_args}
FROM deps
COPY . .
RUN find crates -name '*.rs' -exec touch {{}} + && cargo {cargo_args} \\
    && mkdir -p /out/bin && cp target/{profile_dir}/app /out/bin/
FROM scratch
COPY --from=1 /out /
"""

LIBRUST = """FROM {img}
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=bench-lr-target,target=/src/target,sharing=locked \\
    --mount=type=cache,id=bench-lr-cargo-home,target=/usr/local/cargo-home,sharing=locked \\
    CARGO_HOME=/usr/local/cargo-home cargo {cargo_args} && mkdir -p /out/bin && cp target/{profile_dir}/app /out/bin/
FROM scratch
COPY --from=0 /out /
"""

# The recipe's install step, dropped for the benchmark (rsnap is in the base image).
RECIPE_INSTALL = re.compile(r"^ARG RSNAP_PIP\n.*?/usr/local/bin/rsnap\n", re.M | re.S)

BASE_IMAGE = """FROM {test_image}
RUN python3 -m venv /opt/rsnap && /opt/rsnap/bin/pip install -q rsnap && ln -sf /opt/rsnap/bin/rsnap /usr/local/bin/rsnap
"""

_STEP_HEAD = re.compile(r"^#(\d+) (\D.*)$")   # a step's first line names it
_STEP_DONE = re.compile(r"^#(\d+) DONE ([\d.]+)s$")
_RESTORE = re.compile(r"^rsnap: (\w+) hit .* in ([\d.]+)s$")
_MISS = re.compile(r"^rsnap: miss")
_SAVE = re.compile(r"^rsnap: saved .* in ([\d.]+)s$")
_TIMED = re.compile(r"^#(\d+) ([\d.]+) (.*)$")


def log(msg: str) -> None:
    print(f"[bk] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- workspaces

class Fixture:
    """fixtures/ws without registry/git dependencies; edits the bottom crate."""
    name = "fixture"

    def __init__(self, tmp: Path):
        self.ws = bk.path_only_ws(tmp / "ws")

    def edit(self, rev: int) -> None:
        lib = self.ws / "crates" / "core" / "src" / "lib.rs"
        lib.write_text(re.sub(r"REVISION: u32 = \d+;", f"REVISION: u32 = {rev};", lib.read_text()))

    def stop(self) -> None:
        pass


class Realistic:
    """bench/realistic.py's workspace, its registry served on loopback; edits the leaf bin."""
    name = "realistic"

    def __init__(self, root: Path):
        import realistic
        from fixtures.tools import cargohome
        self.bench = realistic.setup(root, fetch=False)
        self.ws = self.bench.ws
        (self.ws / ".cargo").mkdir(exist_ok=True)
        (self.ws / ".cargo" / "config.toml").write_text(cargohome.config_toml(self.bench.server.index_url))

    def edit(self, rev: int) -> None:
        self.bench.edit_leaf(rev)

    def stop(self) -> None:
        self.bench.stop()


def realistic_possible() -> tuple[bool, str]:
    import realistic
    if not realistic.missing_crates():
        return True, ""
    if os.geteuid() == 0:
        return True, ""      # ensure_debian_crates() will apt-get them
    return False, f"Debian crates missing ({', '.join(realistic.missing_crates()[:4])}, ...) and not root"


def chef_recipe(ws: Path, dest: Path) -> None:
    """What `cargo chef prepare`/`cook` start from: manifests, lockfile, cargo config, stub targets."""
    for rel in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml",
                *(str(p.relative_to(ws)) for p in ws.glob("crates/*/Cargo.toml"))]:
        if (ws / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ws / rel, dest / rel)
    for manifest in dest.glob("crates/*/Cargo.toml"):
        crate, real = manifest.parent, ws / manifest.parent.relative_to(dest)
        (crate / "src").mkdir(exist_ok=True)
        for f in ("src/main.rs", "src/lib.rs", "build.rs"):
            if (real / f).exists():
                (crate / f).write_text("fn main() {}\n" if f != "src/lib.rs" else "")


# ---------------------------------------------------------------- images and logs

def base_image(session) -> str:
    """The tests' image (host toolchain + offline wheels) with rsnap installed in /opt/rsnap."""
    tag = "rsnap-bench-bk:" + session.test_image.split(":", 1)[1]
    if bk.docker("image", "inspect", tag, check=False).returncode:
        with tempfile.TemporaryDirectory(prefix="rsnap-bench-bk-img-") as ctx:
            (Path(ctx) / "Dockerfile").write_text(BASE_IMAGE.format(test_image=session.test_image))
            bk.docker("build", "--network=host", "-q", "-t", tag, ctx)
    return tag


def rsnap_dockerfile(dest: Path) -> Path:
    text, n = RECIPE_INSTALL.subn("", bk.RECIPE.read_text())
    if n != 1:
        raise SystemExit(f"bench: could not find the pip-install RUN in {bk.RECIPE} (found {n})")
    dest.write_text(text)
    return dest


def breakdown(log_text: str) -> dict:
    """Seconds per BuildKit step (context transfer, RUN steps, export) and, for rsnap, the phases
    inside its RUN, from `--progress=plain`'s per-line timestamps (seconds since the step began)."""
    names, done, out = {}, {}, {}
    lines = log_text.splitlines()
    for line in lines:
        if m := _STEP_DONE.match(line):
            done[m[1]] = float(m[2])
        elif m := _STEP_HEAD.match(line):
            names.setdefault(m[1], m[2])
    for step, name in names.items():
        if step in done:
            if "load build context" in name:
                out["context_s"] = done[step]
            elif " RUN " in name:
                out["run_s"] = round(out.get("run_s", 0.0) + done[step], 2)
            elif "exporting" in name:
                out["export_s"] = done[step]
    seeded = restored = None
    for line in lines:
        if not (m := _TIMED.match(line)):
            continue
        at, msg = float(m[2]), m[3]
        if msg.startswith("rsnap: empty store mount, seeding"):
            seeded = at
        elif r := _RESTORE.match(msg):
            out["restore"], out["restore_s"], restored = r[1], float(r[2]), at
            if seeded is not None:   # cp -a of the seed + rsnap's start-up before its own clock
                out["seed_copy_s"] = round(at - float(r[2]) - seeded, 2)
        elif _MISS.match(msg):
            out["restore"], restored = "miss", at
        elif s := _SAVE.match(msg):
            out["save_s"] = float(s[1])
        elif msg.lstrip().startswith("Finished") and restored is not None:
            out["cargo_s"] = round(at - restored, 2)
    return out


# ---------------------------------------------------------------- the benchmark

def run(args) -> dict:
    session = bk.setup()
    img = base_image(session)
    log(f"base image {img}")
    profile_dir = "release" if args.profile == "release" else "debug"
    cargo_args = "build --locked" + (" --release" if args.profile == "release" else "")
    res = {"workspace": None, "profile": args.profile, "repeat": args.repeat, "base_image": img,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg_start": loadavg(),
           "nproc": os.cpu_count(), "builds": []}
    with tempfile.TemporaryDirectory(prefix="rsnap-bench-bk-") as tmp:
        tmp = Path(tmp)
        project = Realistic(args.root) if args.realistic else Fixture(tmp)
        res["workspace"] = project.name
        ws = project.ws
        try:
            rev = 0
            for name in args.strategies:
                seed = tmp / f"seed-{name}"
                seed.mkdir()
                if name == "rsnap":
                    dockerfile = rsnap_dockerfile(tmp / "rsnap.Dockerfile")
                    build_args = dict(RUST_IMAGE=img, CARGO_ARGS=cargo_args, PROFILE_DIR=profile_dir,
                                      BIN="app", RSNAP_EXPORT="1")
                else:
                    dockerfile = tmp / f"{name}.Dockerfile"
                    dockerfile.write_text({"none": NONE, "chef": CHEF, "librust": LIBRUST}[name].format(
                        img=img, cargo_args=cargo_args, profile_dir=profile_dir))
                    build_args = {}

                def build(runner: str):
                    nonlocal rev
                    rev += 1
                    project.edit(rev)
                    ctx = bk.fresh_copy(ws, tmp / "ctx")
                    if name == "chef":
                        chef_recipe(ws, ctx / "chef-recipe")
                    bk.merge_store(seed, ctx / ".rsnap-seed")
                    (ctx / ".rsnap-seed").mkdir(exist_ok=True)
                    seed_bytes = sum(p.stat().st_size for p in (ctx / ".rsnap-seed").rglob("*") if p.is_file())
                    os.sync()
                    b = bk.build(ctx, dockerfile, tmp / "out", **build_args).check()
                    if (tmp / "out" / "rsnap-store").is_dir():
                        bk.merge_store(tmp / "out" / "rsnap-store", seed)
                    row = {"strategy": name, "runner": runner, "rev": rev, "seconds": round(b.seconds, 2),
                           "units": len(b.compiled), "compiled": b.compiled, "seed_mib": round(seed_bytes / 2**20, 1),
                           "loadavg": loadavg(), **breakdown(b.log)}
                    res["builds"].append(row)
                    extra = "".join(f"  {k}={row[k]}" for k in ("context_s", "restore", "restore_s", "save_s") if k in row)
                    log(f"{name:8} {runner:6} {b.seconds:6.1f} s  {len(b.compiled):3} units{extra}  "
                        f"load {row['loadavg'][0]}")
                    (tmp / f"log-{name}-{runner}-{rev}.txt").write_text(b.log)
                    if args.keep_logs:
                        args.keep_logs.mkdir(parents=True, exist_ok=True)
                        shutil.copy(tmp / f"log-{name}-{runner}-{rev}.txt", args.keep_logs)
                    return row

                bk.prune()
                build("prime")
                for _ in range(args.repeat):
                    build("warm")
                for _ in range(args.repeat):
                    bk.prune()
                    build("fresh")
        finally:
            project.stop()
            bk.prune()
    res["loadavg_end"] = loadavg()
    res["rows"] = summarize(res["builds"], args.strategies)
    return res


def med(values):
    return round(statistics.median(values), 2) if values else None


def summarize(builds: list[dict], strategies) -> list[dict]:
    rows = []
    for name in strategies:
        for runner in ("warm", "fresh"):
            bs = [b for b in builds if b["strategy"] == name and b["runner"] == runner]
            row = {"strategy": name, "runner": runner, "seconds": med([b["seconds"] for b in bs]),
                   "units": med([b["units"] for b in bs]), "all_seconds": [b["seconds"] for b in bs],
                   "all_units": [b["units"] for b in bs]}
            for k in ("context_s", "seed_copy_s", "restore_s", "cargo_s", "save_s", "run_s", "export_s"):
                vals = [b[k] for b in bs if k in b]
                if vals:
                    row[k] = med(vals)
            rows.append(row)
    return rows


def table(res: dict) -> str:
    out = [f"BuildKit benchmark: {res['workspace']} workspace, profile {res['profile']}, "
           f"median of {res['repeat']} ({res['date']}, {res['nproc']} cores; load avg 1/5/15 min "
           f"{res['loadavg_start']} at start, {res['loadavg_end']} at end)", "",
           "| strategy | runner | seconds | units compiled | all runs (s) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        units = int(r["units"]) if r["units"] == int(r["units"]) else r["units"]
        out.append(f"| {r['strategy']} | {r['runner']} | {r['seconds']:.1f} | {units} | "
                   f"{', '.join(f'{s:.1f}' for s in r['all_seconds'])} |")
    notes = []
    for r in res["rows"]:
        if r["strategy"] == "rsnap" and "restore_s" in r:
            notes.append(f"rsnap {r['runner']} (medians, s): context transfer {r.get('context_s')}, RUN step "
                         f"{r.get('run_s')} = seed copy {r.get('seed_copy_s', 0)} + restore {r.get('restore_s')} + "
                         f"cargo {r.get('cargo_s')} + save {r.get('save_s')} + rest; export {r.get('export_s')}")
    return "\n".join(out + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring (or bench/README.md) for what each row times.")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--realistic", dest="realistic", action="store_true", default=None,
                      help="bench/realistic.py's workspace and loopback registry (default when its Debian crates "
                           "are installed or installable)")
    kind.add_argument("--fixture", dest="realistic", action="store_false",
                      help="the 5-crate path-only copy of fixtures/ws")
    parser.add_argument("--repeat", type=int, default=1, help="warm and fresh builds per strategy (medians; default 1)")
    parser.add_argument("--profile", choices=["dev", "release"], default="dev",
                        help="cargo profile (default dev: a release build of the realistic workspace takes ~2.5x "
                             "as long)")
    parser.add_argument("--strategy", dest="strategies", action="append", choices=STRATEGIES,
                        help="run only these (repeatable; default all)")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("RSNAP_BENCH_DIR", "/tmp/rsnap-bench-bk")),
                        help="--realistic: work dir for the registry and workspace (wiped except the staged crates; "
                             "default $RSNAP_BENCH_DIR or /tmp/rsnap-bench-bk)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy every build's plain-progress log here")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    args.strategies = args.strategies or list(STRATEGIES)
    if args.realistic is None:
        args.realistic, why = realistic_possible()
        if not args.realistic:
            log(f"realistic workspace not possible ({why}); using --fixture")
    res = run(args)
    text = table(res)
    if args.json:
        print(text, file=sys.stderr)
        json.dump(res, sys.stdout, indent=1)
        print()
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
