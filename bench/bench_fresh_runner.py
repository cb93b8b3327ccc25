"""Issue 15: how close does a fresh CI runner with rsnap get to a warm laptop?

    python bench/bench_fresh_runner.py [--root DIR] [--repeat N] [--json] [--debian-crate NAME ...] [--no-realistic]

For the bundled realistic workspace (bench/realistic.py) and each `--debian-crate` project
(bench/debian_project.py), after a one-line change in a leaf crate and (realistic workspace
only: a Debian crate is one package) in a crate with dependents (`core_types`), side by side in
one run, medians of --repeat:

| row | what is timed |
|---|---|
| warm build | the change in a warm target dir, `cargo build` (the floor) |
| fresh runner, rsnap | fresh `git clone` at the same path, the change, `rsnap restore` (into an empty target; partial: it leaves out what this build will not read), `cargo build` |
| fresh runner, untar | fresh clone, `zstd -d | tar -x` of the same target, the change, `cargo build` |
| clean build | fresh clone, the change, `cargo build` with no target dir (once per project) |
| save after the change | `rsnap save` vs `tar -c target | zstd -T0` of the warm target after the change |
| persistent runner | `rsnap restore` right after that save (the target dir already holds the snapshot) vs untar |

The fresh runners restore the snapshot/archive of the base commit (the change is never saved
into the store the runners restore from: each job is a branch off the same base). Wall-clock
times after an `os.sync()`, page caches warm; the machine may be shared (load is printed).
rsnap is this checkout pip-installed (not editable) into `<root>/rsnap-venv`.
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
import debian_project  # noqa: E402
import realistic  # noqa: E402

DEPS_FILE = "crates/core_types/src/lib.rs"   # realistic: a crate four others depend on
DEPS_MARKER = "pub const RSNAP_BENCH_EDIT: u32 = "


def log(msg: str) -> None:
    print(f"[fresh] {msg}", file=sys.stderr, flush=True)


def edit(bench, kind: str, tag: int) -> None:
    if kind == "leaf":
        bench.edit_leaf(tag)
        return
    path = bench.ws / DEPS_FILE
    lines = [line for line in path.read_text().splitlines() if not line.startswith(DEPS_MARKER)]
    path.write_text("\n".join(lines + [f"{DEPS_MARKER}{tag};"]) + "\n")


def med(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def drop_snapshot(store: Path, name: str) -> None:
    """Forget a snapshot the fresh runners must not restore (its packs stay: unreferenced)."""
    (store / name).unlink(missing_ok=True)


def untar_runner(bench, archive: Path, kind: str, tag: int) -> dict:
    bench.fresh_clone()
    restore = bs.tar_restore(bench, archive)
    edit(bench, kind, tag)
    build = bs.cargo_build(bench)
    return {"restore": restore.wall, "build": build.time.wall, "compiled": build.compiled}


def rsnap_runner(bench, store: Path, kind: str, tag: int) -> dict:
    """As CI runs it: the checkout (with the change) comes before the restore, which then leaves
    out what the build will not read (partial restore)."""
    bench.fresh_clone()
    edit(bench, kind, tag)
    restore, out = bs.rsnap(bench, store, "restore")
    if out["result"] != "exact":
        raise RuntimeError(f"not an exact hit: {out}")
    build = bs.cargo_build(bench)
    return {"restore": restore.wall, "build": build.time.wall, "compiled": build.compiled,
            "timings": out.get("timings", {}), "files_written": out["files_written"],
            "bytes_written": out.get("bytes_written"), "skipped": out.get("skipped")}


def warm_and_saves(bench, store: Path, scratch: Path, kind: str, tag: int, first: str) -> dict:
    """In the target the last runner built: the change again (new value), a warm build, then
    both saves of that target (alternating order), then the persistent runner's restore."""
    edit(bench, kind, tag)
    build = bs.cargo_build(bench)
    saves = {}
    for who in ([first, "tar" if first == "rsnap" else "rsnap"]):
        if who == "tar":
            saves["tar"], saves["tar_bytes"] = bs.tar_save(bench, scratch)
        else:
            saves["rsnap"], out = bs.rsnap(bench, store, "save")
            saves["rsnap_bytes"], saves["name"] = out["bytes_written"], out["snapshot"]
    persistent, pout = bs.rsnap(bench, store, "restore")
    drop_snapshot(store, saves["name"])
    return {"warm": build.time.wall, "warm_compiled": build.compiled, "tar_save": saves["tar"].wall,
            "tar_save_bytes": saves["tar_bytes"], "rsnap_save": saves["rsnap"].wall,
            "rsnap_save_bytes": saves["rsnap_bytes"], "persistent_restore": persistent.wall,
            "persistent_settled": pout.get("settled_roots", []), "persistent_written": pout["files_written"],
            "persistent_timings": pout.get("timings", {})}


def bench_project(bench, name: str, kinds: list[str], repeat: int) -> dict:
    root = bench.root
    archive, store, scratch = root / "base.tar.zst", root / "store", root / "scratch.tar.zst"
    shutil.rmtree(store, ignore_errors=True)
    res: dict = {"project": name, "load_start": round(os.getloadavg()[0], 2)}
    # base: clean build of the base commit, its archive and its snapshot
    realistic.retire(bench.target, root)
    clean = bs.cargo_build(bench)
    files, size, _unique = bs.tree_size(bench.target)
    bs.tar_save(bench, archive)
    bs.rsnap(bench, store, "save")
    log(f"{name}: clean build {clean.time.wall:.1f}s, {clean.compiled} units, target {size / 2**20:.0f} MiB")
    res["clean_build_base"] = round(clean.time.wall, 3)
    res["target_mib"], res["target_files"] = round(size / 2**20), files
    tag = 1000
    for kind in kinds:
        runs = []
        for i in range(repeat):
            tag += 1
            pair = [("untar", lambda: untar_runner(bench, archive, kind, tag)),
                    ("rsnap", lambda: rsnap_runner(bench, store, kind, tag))]
            row = {}
            for who, fn in (pair if i % 2 == 0 else pair[::-1]):
                row[who] = fn()
            tag += 1
            row.update(warm_and_saves(bench, store, scratch, kind, tag, "rsnap" if i % 2 else "tar"))
            runs.append(row)
            log(f"{name} {kind} {i + 1}: warm {row['warm']:.2f}s | rsnap {row['rsnap']['restore']:.2f}+"
                f"{row['rsnap']['build']:.2f}s ({row['rsnap']['compiled']} compiled) | untar "
                f"{row['untar']['restore']:.2f}+{row['untar']['build']:.2f}s ({row['untar']['compiled']}) | "
                f"save rsnap {row['rsnap_save']:.2f}s tar {row['tar_save']:.2f}s | persistent restore "
                f"{row['persistent_restore']:.3f}s settled={row['persistent_settled']}")
        # clean build after the change: once per kind
        bench.fresh_clone()
        tag += 1
        edit(bench, kind, tag)
        clean_after = bs.cargo_build(bench)
        r = {
            "warm_build": med([x["warm"] for x in runs]),
            "rsnap_restore": med([x["rsnap"]["restore"] for x in runs]),
            "rsnap_build": med([x["rsnap"]["build"] for x in runs]),
            "rsnap_fresh": med([x["rsnap"]["restore"] + x["rsnap"]["build"] for x in runs]),
            "rsnap_written_mib": round(statistics.median(x["rsnap"]["bytes_written"] or 0 for x in runs) / 2**20, 1),
            "rsnap_left_out_mib": round(statistics.median((x["rsnap"]["skipped"] or {}).get("bytes", 0)
                                                          for x in runs) / 2**20, 1),
            "untar_restore": med([x["untar"]["restore"] for x in runs]),
            "untar_build": med([x["untar"]["build"] for x in runs]),
            "untar_fresh": med([x["untar"]["restore"] + x["untar"]["build"] for x in runs]),
            "clean_build": round(clean_after.time.wall, 3),
            "compiled": {"warm": max(x["warm_compiled"] for x in runs),
                         "rsnap": max(x["rsnap"]["compiled"] for x in runs),
                         "untar": max(x["untar"]["compiled"] for x in runs), "clean": clean_after.compiled},
            "rsnap_save": med([x["rsnap_save"] for x in runs]), "tar_save": med([x["tar_save"] for x in runs]),
            "rsnap_save_mib": round(statistics.median(x["rsnap_save_bytes"] for x in runs) / 2**20, 2),
            "tar_save_mib": round(statistics.median(x["tar_save_bytes"] for x in runs) / 2**20, 2),
            "persistent_restore": med([x["persistent_restore"] for x in runs]),
            "persistent_settled": runs[-1]["persistent_settled"],
            "restore_timings": {k: med([x["rsnap"]["timings"].get(k, 0) for x in runs])
                                for k in runs[-1]["rsnap"]["timings"]},
            "persistent_timings": {k: med([x["persistent_timings"].get(k, 0) for x in runs])
                                   for k in runs[-1]["persistent_timings"]},
            "restore_pairs": [round(x["rsnap"]["restore"] / x["untar"]["restore"], 3) for x in runs],
            "save_pairs": [round(x["rsnap_save"] / x["tar_save"], 3) for x in runs],
        }
        r["fresh_vs_warm"] = round(r["rsnap_fresh"] / r["warm_build"], 3)
        r["untar_fresh_vs_warm"] = round(r["untar_fresh"] / r["warm_build"], 3)
        r["restore_vs_untar"] = round(r["rsnap_restore"] / r["untar_restore"], 3)
        r["save_vs_tar"] = round(r["rsnap_save"] / r["tar_save"], 3)
        r["persistent_vs_untar"] = round(r["persistent_restore"] / r["untar_restore"], 3)
        res[kind] = r
    res["load_end"] = round(os.getloadavg()[0], 2)
    return res


def table(results: list[dict]) -> str:
    head = ("| project, change | warm build | fresh: rsnap restore + build | fresh: untar + build | clean build "
            "| fresh/warm | restore/untar | save rsnap / tar | persistent restore / untar |")
    lines = [head, "|" + "---|" * 9]
    for res in results:
        for kind in ("leaf", "deps"):
            r = res.get(kind)
            if r is None:
                continue
            c = r["compiled"]
            lines.append(
                f"| {res['project']} ({res['target_mib']} MiB), {kind} | {r['warm_build']:.2f} s ({c['warm']}) "
                f"| {r['rsnap_restore']:.2f} + {r['rsnap_build']:.2f} = {r['rsnap_fresh']:.2f} s ({c['rsnap']}) "
                f"| {r['untar_restore']:.2f} + {r['untar_build']:.2f} = {r['untar_fresh']:.2f} s ({c['untar']}) "
                f"| {r['clean_build']:.1f} s ({c['clean']}) | {r['fresh_vs_warm']:.2f}x "
                f"| {r['restore_vs_untar']:.2f}x | {r['rsnap_save']:.2f} / {r['tar_save']:.2f} s = {r['save_vs_tar']:.2f}x "
                f"({r['rsnap_save_mib']} / {r['tar_save_mib']} MiB) "
                f"| {r['persistent_restore']:.3f} / {r['untar_restore']:.2f} s = {r['persistent_vs_untar']:.3f}x |")
    lines.append("(n) = units compiled. Loads: " + ", ".join(f"{r['project']} {r['load_start']}->{r['load_end']}"
                                                              for r in results))
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        is_realistic = res["project"] == "realistic"
        for kind in ("leaf", "deps"):
            r = res.get(kind)
            if r is None:
                continue
            checks = ([("fresh_vs_warm", r["fresh_vs_warm"], 1.5), ("restore_vs_untar", r["restore_vs_untar"], 0.8)]
                      if is_realistic else
                      [("restore_vs_untar", r["restore_vs_untar"], 1.0), ("save_vs_tar", r["save_vs_tar"], 0.5)])
            checks.append(("persistent_vs_untar", r["persistent_vs_untar"], 0.1))
            for name, value, limit in checks:
                out.append(f"{'PASS' if value <= limit else 'MISS'} {res['project']} {kind}: {name} {value:.3f} "
                           f"(target <= {limit})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("RSNAP_BENCH_DIR", "/tmp/rsnap-fresh")))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debian-crate", action="append", default=None, help="repeatable (default: clap regex serde_json)")
    p.add_argument("--no-realistic", action="store_true")
    p.add_argument("--rsnap", help="rsnap executable (default: this checkout pip-installed under --root)")
    args = p.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    bs.ensure_zstd()
    bs._RSNAP.append(str(Path(args.rsnap).resolve()) if args.rsnap else bs.install_rsnap(root))
    results = []
    if not args.no_realistic:
        bench = realistic.setup(root / "realistic")
        try:
            results.append(bench_project(bench, "realistic", ["leaf", "deps"], args.repeat))
        finally:
            bench.stop()
    for crate in (args.debian_crate if args.debian_crate is not None else ["clap", "regex", "serde_json"]):
        bench = debian_project.setup(root / f"deb-{crate}", crate, None, {})
        try:
            results.append(bench_project(bench, crate, ["leaf"], args.repeat))
        finally:
            bench.stop()
    text = table(results) + "\n" + "\n".join(verdicts(results))
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
