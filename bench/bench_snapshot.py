"""Benchmark rsnap against tar+zstd on a realistic workspace (see bench/realistic.py).

    python bench/bench_snapshot.py [--root DIR] [--repeat N] [--json]

Prints one table; with --json, the table goes to stderr and one JSON object to stdout.
Each timed step is wall-clock (time.perf_counter around the subprocess), the median
of --repeat runs except the clean build and the first rsnap save (run once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realistic  # noqa: E402

TARGETS = {  # name -> (description, limit, compare)
    "restore_vs_tar": ("rsnap restore / tar restore time", 1.0, "<="),
    "cycle_speedup": ("clean build / rsnap fresh-checkout cycle", 10.0, ">="),
    "save_time_vs_tar": ("rsnap save / tar save time after a 1-line change", 0.25, "<="),
    "save_bytes_vs_tar": ("rsnap save / tar save bytes after a 1-line change", 0.10, "<="),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- running things

def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc


def shell(script: str, cwd: Path, env: dict) -> float:
    return timed(["bash", "-c", f"set -euo pipefail; {script}"], cwd, env)[0]


@dataclass
class Build:
    seconds: float
    units: int       # compiler-artifact messages
    compiled: int    # of which fresh: false
    names: list[str] = field(default_factory=list)


def cargo_build(bench: realistic.Realistic) -> Build:
    seconds, proc = timed(["cargo", "build", "--message-format=json"], bench.ws, bench.env)
    messages = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    artifacts = [m for m in messages if m.get("reason") == "compiler-artifact"]
    dirty = [m["target"]["name"] for m in artifacts if not m["fresh"]]
    return Build(seconds, len(artifacts), len(dirty), dirty)


def tar_save(bench: realistic.Realistic, archive: Path) -> tuple[float, int]:
    seconds = shell(f"tar -cf - target | zstd -T0 -q -f -o '{archive}'", bench.ws, bench.env)
    return seconds, archive.stat().st_size


def tar_restore(bench: realistic.Realistic, archive: Path) -> float:
    return shell(f"zstd -T0 -d -q -c '{archive}' | tar -xf -", bench.ws, bench.env)


def rsnap(bench: realistic.Realistic, store: Path, *args: str) -> tuple[float, dict]:
    seconds, proc = timed(["rsnap", *args, "--store", str(store), "--json", "--quiet"], bench.ws, bench.env)
    return seconds, json.loads(proc.stdout)


def ensure_zstd() -> None:
    if shutil.which("zstd"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "zstd"], env=env, check=True, capture_output=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


# ---------------------------------------------------------------- the phases

def phase_clean_build(bench: realistic.Realistic) -> dict:
    shutil.rmtree(bench.target, ignore_errors=True)
    build = cargo_build(bench)
    files, size = tree_size(bench.target)
    log(f"clean build {build.seconds:.1f}s, {build.compiled} units, target {size / 2**20:.0f} MiB in {files} files")
    return {"seconds": build.seconds, "units": build.units, "compiled": build.compiled,
            "target_files": files, "target_bytes": size}


def phase_full_saves(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    tar = [tar_save(bench, archive) for _ in range(repeat)]
    shutil.rmtree(store, ignore_errors=True)
    seconds, out = rsnap(bench, store, "save")
    log(f"full saves: tar {median([t for t, _ in tar]):.2f}s, rsnap first save {seconds:.2f}s")
    return {"tar_seconds": median([t for t, _ in tar]), "tar_bytes": tar[-1][1],
            "rsnap_seconds": seconds, "rsnap_bytes": out["bytes_written"], "rsnap_files": out["files"],
            "rsnap_reported_seconds": out["seconds"]}


def naive_cycle(bench: realistic.Realistic, archive: Path) -> tuple[float, Build]:
    bench.fresh_clone()
    restore = tar_restore(bench, archive)
    return restore, cargo_build(bench)


def rsnap_cycle(bench: realistic.Realistic, store: Path) -> tuple[float, dict, Build]:
    bench.fresh_clone()
    restore, out = rsnap(bench, store, "restore")
    if out["result"] != "exact":
        raise RuntimeError(f"rsnap restore was not an exact hit: {out}")
    return restore, out, cargo_build(bench)


def phase_cycles(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    naive, fast = [], []
    for i in range(repeat):
        naive.append(naive_cycle(bench, archive))
        fast.append(rsnap_cycle(bench, store))
        log(f"cycle {i + 1}: naive restore {naive[-1][0]:.2f}s + build {naive[-1][1].seconds:.2f}s "
            f"({naive[-1][1].compiled} compiled); rsnap restore {fast[-1][0]:.2f}s + build "
            f"{fast[-1][2].seconds:.2f}s ({fast[-1][2].compiled} compiled)")
    return {
        "tar_restore_seconds": median([r for r, _ in naive]),
        "rsnap_restore_seconds": median([r for r, _, _ in fast]),
        "rsnap_restore_reported_seconds": median([o["seconds"] for _, o, _ in fast]),
        "rsnap_restore_files_written": fast[-1][1]["files_written"],
        "rsnap_restore_sources": fast[-1][1]["sources"],
        "naive_cycle_seconds": median([r + b.seconds for r, b in naive]),
        "naive_compiled": max(b.compiled for _, b in naive),
        "naive_compiled_names": sorted(naive[-1][1].names),
        "rsnap_cycle_seconds": median([r + b.seconds for r, _, b in fast]),
        "rsnap_compiled": max(b.compiled for _, _, b in fast),
        "rsnap_compiled_names": sorted(fast[-1][2].names),
    }


def change_cycle(bench: realistic.Realistic, archive: Path, store: Path, tag: int) -> dict:
    """CI after a one-line commit: fresh clone, rsnap restore, edit, build, then both saves."""
    bench.fresh_clone()
    rsnap(bench, store, "restore")
    bench.edit_leaf(tag)
    build = cargo_build(bench)
    if "app" not in build.names:
        raise RuntimeError(f"the edit of {realistic.LEAF_FILE} did not rebuild app: {build.names}")
    tar_seconds, tar_bytes = tar_save(bench, archive)
    rsnap_seconds, out = rsnap(bench, store, "save")
    log(f"change {tag}: rebuild {build.seconds:.2f}s ({build.compiled} compiled); tar save {tar_seconds:.2f}s "
        f"{tar_bytes / 2**20:.1f} MiB; rsnap save {rsnap_seconds:.2f}s {out['bytes_written'] / 2**20:.2f} MiB "
        f"({out['files_hashed']} files hashed)")
    return {"build": build, "tar_seconds": tar_seconds, "tar_bytes": tar_bytes,
            "rsnap_seconds": rsnap_seconds, "rsnap": out}


def phase_change_saves(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    runs = [change_cycle(bench, archive, store, tag) for tag in range(1, repeat + 1)]
    return {
        "rebuild_seconds": median([r["build"].seconds for r in runs]),
        "rebuild_compiled": max(r["build"].compiled for r in runs),
        "tar_seconds": median([r["tar_seconds"] for r in runs]),
        "tar_bytes": int(median([r["tar_bytes"] for r in runs])),
        "rsnap_seconds": median([r["rsnap_seconds"] for r in runs]),
        "rsnap_reported_seconds": median([r["rsnap"]["seconds"] for r in runs]),
        "rsnap_bytes": int(median([r["rsnap"]["bytes_written"] for r in runs])),
        "rsnap_files_hashed": int(median([r["rsnap"]["files_hashed"] for r in runs])),
    }


# ---------------------------------------------------------------- report

def ratios(res: dict) -> dict:
    cyc, change = res["cycles"], res["change_save"]
    return {
        "restore_vs_tar": cyc["rsnap_restore_seconds"] / cyc["tar_restore_seconds"],
        "cycle_speedup": res["clean_build"]["seconds"] / cyc["rsnap_cycle_seconds"],
        "naive_cycle_speedup": res["clean_build"]["seconds"] / cyc["naive_cycle_seconds"],
        "save_time_vs_tar": change["rsnap_seconds"] / change["tar_seconds"],
        "save_bytes_vs_tar": change["rsnap_bytes"] / change["tar_bytes"],
        "first_save_time_vs_tar": res["full_save"]["rsnap_seconds"] / res["full_save"]["tar_seconds"],
    }


def verdicts(r: dict) -> dict:
    out = {}
    for name, (desc, limit, cmp) in TARGETS.items():
        ok = r[name] <= limit if cmp == "<=" else r[name] >= limit
        out[name] = {"what": desc, "value": round(r[name], 3), "target": f"{cmp} {limit}", "pass": ok}
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(res: dict) -> str:
    clean, full, cyc, change = res["clean_build"], res["full_save"], res["cycles"], res["change_save"]
    r, v = res["ratios"], res["verdicts"]
    mark = lambda name: "PASS" if v[name]["pass"] else "FAIL"  # noqa: E731
    rows = [
        ("clean build (empty target, warm CARGO_HOME)", clean["seconds"], clean["compiled"], "", ""),
        ("full save: tar -c target | zstd -T0", full["tar_seconds"], "", mib(full["tar_bytes"]), ""),
        ("first save: rsnap save (empty store)", full["rsnap_seconds"], "", mib(full["rsnap_bytes"]),
         f"{r['first_save_time_vs_tar']:.2f}x tar time"),
        ("restore target: zstd -T0 -d | tar -x", cyc["tar_restore_seconds"], "", "", ""),
        ("restore target: rsnap restore", cyc["rsnap_restore_seconds"], "", "",
         f"{r['restore_vs_tar']:.2f}x tar (<= 1.0) {mark('restore_vs_tar')}"),
        ("fresh checkout, naive: tar restore + build", cyc["naive_cycle_seconds"], cyc["naive_compiled"], "",
         f"{r['naive_cycle_speedup']:.1f}x faster than clean"),
        ("fresh checkout, rsnap: restore + build", cyc["rsnap_cycle_seconds"], cyc["rsnap_compiled"], "",
         f"{r['cycle_speedup']:.1f}x faster than clean (>= 10) {mark('cycle_speedup')}"),
        ("1-line change: cargo build", change["rebuild_seconds"], change["rebuild_compiled"], "", ""),
        ("save after change: tar -c target | zstd -T0", change["tar_seconds"], "", mib(change["tar_bytes"]), ""),
        ("save after change: rsnap save", change["rsnap_seconds"], "", mib(change["rsnap_bytes"]),
         f"{r['save_time_vs_tar']:.2f}x time (<= 0.25) {mark('save_time_vs_tar')}; "
         f"{100 * r['save_bytes_vs_tar']:.1f}% bytes (<= 10%) {mark('save_bytes_vs_tar')}"),
    ]
    head = (f"workspace: {clean['units']} units, target {mib(clean['target_bytes'])} in {clean['target_files']} files; "
            f"{os.cpu_count()} cores; median of {res['repeat']} runs (clean build and first save: 1 run)")
    lines = [head, "", f"{'step':<46} {'seconds':>8} {'compiled':>8} {'written':>11}  vs target"]
    lines.append("-" * 120)
    for name, secs, units, size, note in rows:
        lines.append(f"{name:<46} {secs:>8.2f} {str(units):>8} {size:>11}  {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def run_benchmark(root: Path, repeat: int) -> dict:
    ensure_zstd()
    log(f"setting up the realistic workspace under {root}")
    bench = realistic.setup(root)
    archive, store = root / "target.tar.zst", root / "store"
    try:
        res = {"repeat": repeat, "root": str(root)}
        res["clean_build"] = phase_clean_build(bench)
        res["full_save"] = phase_full_saves(bench, archive, store, repeat)
        res["cycles"] = phase_cycles(bench, archive, store, repeat)
        res["change_save"] = phase_change_saves(bench, archive, store, repeat)
    finally:
        bench.stop()
    res["ratios"] = {k: round(v, 4) for k, v in ratios(res).items()}
    res["verdicts"] = verdicts(res["ratios"])
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("RSNAP_BENCH_DIR", "/tmp/rsnap-bench")))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    args = parser.parse_args(argv)
    res = run_benchmark(args.root.resolve(), args.repeat)
    print(table(res), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    return 0 if all(v["pass"] for v in res["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
