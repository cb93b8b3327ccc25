"""Rust builds in BuildKit after a one-line change: no caching vs cargo-chef-style dependency
layer vs lib/rust-style cache mount on target/ vs rsnap (examples/buildkit/Dockerfile).

For each strategy: prune BuildKit, prime with a build of revision 1; then
  warm  : one-line edit in the bottom crate, build (BuildKit cache and mounts kept);
  fresh : `docker builder prune -af` (rsnap's store kept outside BuildKit: exported by the last
          build, passed back in the context as the seed), another one-line edit, build.
Every build starts from a fresh copy of the sources (new mtimes, like a fresh clone in CI).
Seconds = wall time of `docker build`; units = `Compiling` lines cargo printed.

    python bench/bench_buildkit.py            # path-only copy of fixtures/ws (5 crates)
Needs what tests/test_buildkit.py needs (.ci/buildkit-setup.sh: dockerd + local images).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import buildkit_util as bk  # noqa: E402

NONE = """FROM {img}
WORKDIR /src
COPY . .
RUN cargo build --release && mkdir -p /out/bin && cp target/release/app /out/bin/
FROM scratch
COPY --from=0 /out /
"""

CHEF = """FROM {img} AS deps
WORKDIR /src
COPY chef-recipe/ ./
RUN cargo build --release
FROM deps
COPY . .
RUN find crates -name '*.rs' -exec touch {{}} + && cargo build --release \
    && mkdir -p /out/bin && cp target/release/app /out/bin/
FROM scratch
COPY --from=1 /out /
"""

LIBRUST = """FROM {img}
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=bench-lr-target,target=/src/target,sharing=locked \\
    --mount=type=cache,id=bench-lr-cargo-home,target=/usr/local/cargo-home,sharing=locked \\
    CARGO_HOME=/usr/local/cargo-home cargo build --release && mkdir -p /out/bin && cp target/release/app /out/bin/
FROM scratch
COPY --from=0 /out /
"""


def chef_recipe(ws: Path, dest: Path) -> None:
    """What `cargo chef prepare` produces: manifests, lockfile, empty targets."""
    for p in ws.rglob("Cargo.*"):
        t = dest / p.relative_to(ws)
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, t)
    for manifest in dest.glob("crates/*/Cargo.toml"):
        crate, real = manifest.parent, ws / manifest.parent.relative_to(dest)
        (crate / "src").mkdir(exist_ok=True)
        for f in ("src/main.rs", "src/lib.rs", "build.rs"):
            if (real / f).exists():
                (crate / f).write_text("fn main() {}\n" if f != "src/lib.rs" else "")


def edit(ws: Path, rev: int) -> None:
    lib = ws / "crates" / "core" / "src" / "lib.rs"
    lib.write_text(re.sub(r"REVISION: u32 = \d+;", f"REVISION: u32 = {rev};", lib.read_text()))


def main() -> None:
    session = bk.setup()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rsnap-bench-bk-") as tmp:
        tmp = Path(tmp)
        ws = bk.path_only_ws(tmp / "ws")
        for name in ("none", "chef", "librust", "rsnap"):
            seed = tmp / f"seed-{name}"
            seed.mkdir()
            if name == "rsnap":
                dockerfile = bk.RECIPE
                args = dict(RUST_IMAGE=session.test_image, CARGO_ARGS="build --release", RSNAP_EXPORT="1")
            else:
                dockerfile = tmp / f"{name}.Dockerfile"
                dockerfile.write_text({"none": NONE, "chef": CHEF, "librust": LIBRUST}[name].format(img=session.test_image))
                args = {}

            def build(rev):
                edit(ws, rev)
                ctx = bk.fresh_copy(ws, tmp / "ctx")
                if name == "chef":
                    chef_recipe(ws, ctx / "chef-recipe")
                bk.merge_store(seed, ctx / ".rsnap-seed")
                (ctx / ".rsnap-seed").mkdir(exist_ok=True)
                b = bk.build(ctx, dockerfile, tmp / "out", **args).check()
                if (tmp / "out" / "rsnap-store").is_dir():
                    bk.merge_store(tmp / "out" / "rsnap-store", seed)
                return b

            bk.prune()
            build(1)
            warm = build(2)
            bk.prune()
            fresh = build(3)
            for runner, b in (("warm", warm), ("fresh", fresh)):
                rows.append((name, runner, b.seconds, len(b.compiled)))
                print(f"{name:8} {runner:6} {b.seconds:6.1f} s  {len(b.compiled):3} units", flush=True)
    print("\n| strategy | runner | seconds | units compiled |\n|---|---|---|---|")
    for name, runner, secs, units in rows:
        print(f"| {name} | {runner} | {secs:.1f} | {units} |")


if __name__ == "__main__":
    main()
