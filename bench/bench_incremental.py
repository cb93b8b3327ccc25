"""Issue 19: incremental compilation on or off in CI, under rsnap.

    python bench/bench_incremental.py [--root DIR] [--repeat N] [--json]

Cargo 1.99 turns incremental off when `CI` is set; the installed cargo does not, so "off" is
`CARGO_INCREMENTAL=0` and "on" is `CARGO_INCREMENTAL=1`. Each mode gets its own store, seeded
by a clean build of the bundled realistic workspace (bench/realistic.py) and its first save.
Then, per change kind (a constant in the leaf bin `app`; a constant in `core_types`, which four
crates depend on), --repeat CI runs per mode, the modes interleaved (on, off, off, on, ...):

    fresh `git clone`, the one-line change (a new value each run), `rsnap restore`,
    `cargo build`, `rsnap save`

each run restoring the previous run's save, as consecutive pushes to one branch do. Printed
side by side: seconds per phase (median, min-max), units compiled, bytes the restore wrote,
bytes the save wrote to the store (compressed), the target size and the store's size at the end.
Wall clock after an `os.sync()`; the machine may be shared (load printed), so read the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_snapshot as bs  # noqa: E402
import bench_fresh_runner as fr  # noqa: E402
import realistic  # noqa: E402

MODES = {"on": "1", "off": "0"}
PHASES = ("restore", "build", "save")


def log(msg: str) -> None:
    print(f"[incremental] {msg}", file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def seed(bench, mode: str, store: Path) -> dict:
    """Clean build of the base commit in this mode, and its first save into an empty store."""
    bench.extra_env["CARGO_INCREMENTAL"] = MODES[mode]
    shutil.rmtree(store, ignore_errors=True)
    bench.fresh_clone()
    build = bs.cargo_build(bench)
    files, size, _ = bs.tree_size(bench.target)
    t, out = bs.rsnap(bench, store, "save")
    log(f"{mode}: clean build {build.time.wall:.1f}s ({build.compiled} units), target {size / 2**20:.0f} MiB, "
        f"first save {t.wall:.2f}s {out['bytes_written'] / 2**20:.1f} MiB")
    return {"clean_build": round(build.time.wall, 2), "target_bytes": size, "target_files": files,
            "first_save": round(t.wall, 2), "first_save_bytes": out["bytes_written"]}


def ci_run(bench, mode: str, store: Path, kind: str, tag: int) -> dict:
    bench.extra_env["CARGO_INCREMENTAL"] = MODES[mode]
    bench.fresh_clone()
    fr.edit(bench, kind, tag)
    restore, rout = bs.rsnap(bench, store, "restore")
    if rout["result"] != "exact":
        raise RuntimeError(f"{mode}: not an exact hit: {rout}")
    build = bs.cargo_build(bench)
    save, sout = bs.rsnap(bench, store, "save")
    row = {"restore": restore.wall, "build": build.time.wall, "save": save.wall, "compiled": build.compiled,
           "restore_bytes": rout["bytes_written"], "save_bytes": sout["bytes_written"],
           "target_bytes": bs.tree_size(bench.target)[1]}
    log(f"{mode} {kind} {tag}: restore {restore.wall:.2f}s ({rout['bytes_written'] / 2**20:.0f} MiB) + build "
        f"{build.time.wall:.2f}s ({build.compiled} compiled) + save {save.wall:.2f}s "
        f"({sout['bytes_written'] / 2**20:.2f} MiB) = {restore.wall + build.time.wall + save.wall:.2f}s")
    return row


def summary(runs: list[dict]) -> dict:
    def spread(values):
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}
    out = {p: spread([r[p] for r in runs]) for p in PHASES}
    out["total"] = spread([sum(r[p] for p in PHASES) for r in runs])
    for k in ("compiled", "restore_bytes", "save_bytes", "target_bytes"):
        out[k] = spread([r[k] for r in runs])
    return out


def run(root: Path, repeat: int) -> dict:
    bench = realistic.setup(root / "realistic")
    res: dict = {"load_start": round(os.getloadavg()[0], 2), "repeat": repeat, "modes": {}}
    try:
        stores = {mode: root / f"store-{mode}" for mode in MODES}
        for mode in MODES:
            res["modes"][mode] = {"seed": seed(bench, mode, stores[mode])}
        tag = 1000
        for kind in ("leaf", "deps"):
            runs: dict[str, list] = {mode: [] for mode in MODES}
            for i in range(repeat):
                order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
                tag += 1
                for mode in order:
                    runs[mode].append(ci_run(bench, mode, stores[mode], kind, tag))
            for mode in MODES:
                res["modes"][mode][kind] = summary(runs[mode])
                res["modes"][mode][kind]["runs"] = runs[mode]
        for mode in MODES:
            res["modes"][mode]["store_bytes"] = dir_bytes(stores[mode])
    finally:
        bench.stop()
    res["load_end"] = round(os.getloadavg()[0], 2)
    return res


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(res: dict) -> str:
    m = res["modes"]
    lines = [f"incremental on (CARGO_INCREMENTAL=1) vs off (=0), realistic workspace, {res['repeat']} CI runs "
             f"per mode and change; median (min-max); load {res['load_start']} -> {res['load_end']}",
             "| change | mode | restore s | build s (units) | save s | total s | restore wrote MiB "
             "| save wrote MiB | target MiB |", "|" + "---|" * 9]

    def cell(s):
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
    for kind in ("leaf", "deps"):
        for mode in MODES:
            s = m[mode][kind]
            lines.append(f"| {kind} | {mode} | {cell(s['restore'])} | {cell(s['build'])} ({s['compiled']['median']:.0f}) "
                         f"| {cell(s['save'])} | {cell(s['total'])} | {mib(s['restore_bytes']['median'])} "
                         f"| {mib(s['save_bytes']['median'])} ({mib(s['save_bytes']['min'])}-{mib(s['save_bytes']['max'])}) "
                         f"| {mib(s['target_bytes']['median'])} |")
    for mode in MODES:
        s = m[mode]["seed"]
        lines.append(f"{mode}: clean build {s['clean_build']:.1f} s, target {mib(s['target_bytes'])} MiB, first save "
                     f"{s['first_save']:.2f} s writing {mib(s['first_save_bytes'])} MiB; store at the end "
                     f"{mib(m[mode]['store_bytes'])} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("RSNAP_BENCH_DIR", "/tmp/rsnap-incremental")))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rsnap", help="rsnap executable (default: this checkout pip-installed under --root)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    bs._RSNAP.append(str(Path(args.rsnap).resolve()) if args.rsnap else bs.install_rsnap(root))
    res = run(root, args.repeat)
    print(table(res), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
