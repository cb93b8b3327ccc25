"""GC benchmark: snapshot size per churn iteration with and without GC, and GC time.

Part 1 (fixture workspace, `fixtures/ws`): the churn of tests/test_gc.py, i.e. every
iteration starts from an empty target (a fresh CI runner), `rsnap restore`, a change
(registry dependency bump, feature toggle, dev/release switch, source edit, tests),
the builds, then `rsnap save`; once with GC before each save and once without.
Prints a table of target-dir and snapshot sizes per iteration, the size of a clean
build of the final state, and writes a PNG plot (matplotlib) and a JSON file.

Part 2 (realistic workspace, bench/realistic.py: ~100 units of real crates): clean
debug build + `cargo test --no-run`, then a restore-like epoch (`arm`), a one-line
edit and `cargo build`; times `usage.arm`, `gc.collect(dry_run=True)` and
`gc.collect()`. `--workspace PATH [--cargo-home PATH]` uses an existing built
workspace instead (GC is then timed on whatever its target holds).

    python bench/bench_gc.py [--iterations 20] [--out bench/out] [--skip-realistic]
    python bench/bench_gc.py --workspace ~/src/myproj --cargo-home ~/.cargo
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from cargo_util import create_workspace, mkgitdep, mkregistry  # noqa: E402
from rsnap.cargo import gc, usage  # noqa: E402
from rsnap.cargo import layout as cargo_layout  # noqa: E402
from rsnap.progress import human_bytes  # noqa: E402

import test_gc as churn  # noqa: E402  (the churn driver is shared with the acceptance test)


def mib(n: int) -> str:
    return f"{n / (1 << 20):8.1f}"


def fixture_churn(root: Path, iterations: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    reg = mkregistry.serve(mkregistry.build_registry(mkregistry.default_crate_dirs(), root / "registry"), 0)
    try:
        gitdep = root / "gitdep"
        mkgitdep.make_gitdep(gitdep)
        results = {}
        for label, with_gc in (("gc", True), ("no-gc", False)):
            ws = create_workspace(root / label / "ws", reg.index_url, gitdep.as_uri())
            started = time.monotonic()

            def show(row, label=label):
                print(f"  [{label}] {row['step']:>2} {row['desc']:<14} snapshot {human_bytes(row['snapshot_bytes'])}",
                      file=sys.stderr, flush=True)
            rows = churn.run_churn(ws, root / label / "store", iterations, with_gc=with_gc, on_step=show)
            results[label] = {"rows": rows, "seconds": round(time.monotonic() - started, 1)}
            if with_gc:
                results["clean_final_target_bytes"] = churn.clean_target_bytes(ws, rows[-1]["commands"],
                                                                               root / "clean-target")
        return results
    finally:
        reg.stop()


def print_churn(res: dict) -> None:
    gc_rows, raw_rows = res["gc"]["rows"], res["no-gc"]["rows"]
    clean = res["clean_final_target_bytes"]
    print("\nChurn on fixtures/ws (MiB; snapshot = total bytes of the saved snapshot, all roots)")
    print(f"{'it':>3} {'change':<14} {'target+GC':>9} {'snap+GC':>9} {'GC freed':>9} {'GC s':>6} "
          f"{'target':>9} {'snap noGC':>9}")
    for a, b in zip(gc_rows, raw_rows):
        print(f"{a['step']:>3} {a['desc']:<14} {mib(a['target_bytes']):>9} {mib(a['snapshot_bytes']):>9} "
              f"{mib(a['gc_removed_bytes']):>9} {a['gc_seconds']:>6.2f} {mib(b['target_bytes']):>9} "
              f"{mib(b['snapshot_bytes']):>9}")
    last = gc_rows[-1]
    print(f"clean build of the final state: target {mib(clean).strip()} MiB; with GC the last snapshot is "
          f"{last['snapshot_bytes'] / clean:.2f}x that (target part "
          f"{last['snapshot_target_bytes'] / clean:.2f}x), without GC {raw_rows[-1]['snapshot_bytes'] / clean:.2f}x")
    print(f"wall time: with GC {res['gc']['seconds']}s, without {res['no-gc']['seconds']}s")


def plot_churn(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no plot", file=sys.stderr)
        return None
    gc_rows, raw_rows = res["gc"]["rows"], res["no-gc"]["rows"]
    steps = [r["step"] for r in gc_rows]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, [r["snapshot_bytes"] / (1 << 20) for r in raw_rows], "o-", label="snapshot, no GC")
    ax.plot(steps, [r["snapshot_bytes"] / (1 << 20) for r in gc_rows], "s-", label="snapshot, GC before save")
    ax.axhline(res["clean_final_target_bytes"] / (1 << 20), color="gray", ls="--", label="clean build of final state")
    ax.axhline(1.2 * res["clean_final_target_bytes"] / (1 << 20), color="gray", ls=":", label="1.2x clean")
    ax.set_xticks(steps)
    ax.set_xticklabels([f"{r['step']}\n{r['desc']}" for r in gc_rows], rotation=70, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("rsnap: snapshot size over a churn of restore/change/build/save")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _lay(root: Path, cargo_home: Path) -> cargo_layout.Workspace:
    t = root / "target"
    return cargo_layout.Workspace(root=root, target_dir=t, build_dir=t, cargo_home=cargo_home,
                                  manifest_path=root / "Cargo.toml")


def realistic_gc(root: Path, workspace: Path | None, cargo_home: Path | None) -> dict:
    res: dict = {}
    if workspace is not None:
        home = cargo_home or Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        ws = _lay(workspace.resolve(), home)
        res["workspace"] = str(workspace)
        env = None
    else:
        import realistic
        rl = realistic.setup(root)
        env = rl.env
        ws = _lay(rl.ws, rl.cargo_home)
        res["workspace"] = f"bench/realistic.py at {rl.ws}"
        t = time.perf_counter()
        subprocess.run(["cargo", "build", "-q"], cwd=rl.ws, env=env, check=True)
        res["clean_build_s"] = round(time.perf_counter() - t, 1)
        subprocess.run(["cargo", "test", "--no-run", "-q"], cwd=rl.ws, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.perf_counter()
        usage.arm(ws)
        res["arm_s"] = round(time.perf_counter() - t, 3)
        rl.edit_leaf(1)
        subprocess.run(["cargo", "build", "-q"], cwd=rl.ws, env=env, check=True)
    res["target_bytes_before"] = churn.tree_bytes(ws.target_dir)
    res["units"] = len(gc.inventory([ws.target_dir]).units)
    t = time.perf_counter()
    dry = gc.collect(ws, dry_run=True)
    res["dry_run_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    real = gc.collect(ws)
    res["gc_s"] = round(time.perf_counter() - t, 3)
    res["gc_reported_s"] = real["seconds"]
    res["signal"] = real["signal"]["kind"]
    res["removed"] = real["removed"]
    res["kept_bytes"] = real["kept"]["bytes"]
    res["target_bytes_after"] = churn.tree_bytes(ws.target_dir)
    t = time.perf_counter()
    again = gc.collect(ws)
    res["gc_nothing_to_do_s"] = round(time.perf_counter() - t, 3)
    res["second_gc_removed_units"] = again["removed"]["units"]
    res["dry_run_matches"] = dry["removed"] == real["removed"]
    if env is not None:
        proc = subprocess.run(["cargo", "build", "--message-format=json"], cwd=ws.root, env=env,
                              capture_output=True, text=True, check=True)
        fresh = [json.loads(line).get("fresh") for line in proc.stdout.splitlines()
                 if line.startswith('{"reason":"compiler-artifact"')]
        res["noop_build_after_gc_all_fresh"] = all(fresh)
        rl.stop()
    return res


def print_realistic(r: dict) -> None:
    print(f"\nGC on a realistic workspace ({r['workspace']}): {r['units']} units, target "
          f"{human_bytes(r['target_bytes_before'])} -> {human_bytes(r['target_bytes_after'])}")
    if "clean_build_s" in r:
        print(f"  clean debug build {r['clean_build_s']}s; arm (restore epoch) {r['arm_s']}s")
    print(f"  gc --dry-run {r['dry_run_s']}s; gc {r['gc_s']}s (rsnap's own figure {r['gc_reported_s']}s, "
          f"signal {r['signal']}); gc with nothing to remove {r['gc_nothing_to_do_s']}s")
    for reason, t in r["removed"]["by_reason"].items():
        print(f"    removed {reason:<26} {t['units']:>5} units {human_bytes(t['bytes']):>10}")
    if "noop_build_after_gc_all_fresh" in r:
        print(f"  no-op cargo build after GC fully fresh: {r['noop_build_after_gc_all_fresh']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("RSNAP_BENCH_DIR", tempfile.gettempdir())) / "rsnap-bench-gc")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--skip-churn", action="store_true")
    ap.add_argument("--skip-realistic", action="store_true")
    ap.add_argument("--workspace", type=Path, help="time GC on this built workspace instead of bench/realistic.py")
    ap.add_argument("--cargo-home", type=Path)
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    results = {}
    if not args.skip_churn:
        res = fixture_churn(args.root / "churn", args.iterations)
        results["churn"] = res
        print_churn(res)
        png = plot_churn(res, args.out / "gc_churn.png")
        if png:
            print(f"plot: {png}")
    if not args.skip_realistic:
        r = realistic_gc(args.root / "realistic", args.workspace, args.cargo_home)
        results["realistic"] = r
        print_realistic(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gc_bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"load average at end: {os.getloadavg()[0]:.2f}; results: {args.out / 'gc_bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
