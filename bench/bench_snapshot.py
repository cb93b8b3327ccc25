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
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import debian_project  # noqa: E402
import project  # noqa: E402
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

@dataclass
class Timing:
    wall: float  # seconds, time.perf_counter around the subprocess
    cpu: float   # user + sys seconds of the subprocess and its children (robust to a busy machine)


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[Timing, subprocess.CompletedProcess]:
    """Run ``cmd`` and time it. Dirty pages of earlier steps are flushed first (os.sync), so a
    step does not pay for the writeback of the one before it; page caches stay warm."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Timing(wall, cpu), proc


def shell(script: str, cwd: Path, env: dict) -> Timing:
    return timed(["bash", "-c", f"set -euo pipefail; {script}"], cwd, env)[0]


@dataclass
class Build:
    time: Timing
    units: int       # compiler-artifact messages
    compiled: int    # of which fresh: false
    names: list[str] = field(default_factory=list)


def cargo_build(bench: realistic.Realistic) -> Build:
    t, proc = timed(["cargo", "build", "--message-format=json"], bench.ws, bench.env)
    messages = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    artifacts = [m for m in messages if m.get("reason") == "compiler-artifact"]
    dirty = [m["target"]["name"] for m in artifacts if not m["fresh"]]
    return Build(t, len(artifacts), len(dirty), dirty)


def tar_save(bench: realistic.Realistic, archive: Path) -> tuple[Timing, int]:
    t = shell(f"tar -cf - target | zstd -T0 -q -f -o '{archive}'", bench.ws, bench.env)
    return t, archive.stat().st_size


def tar_restore(bench: realistic.Realistic, archive: Path) -> Timing:
    return shell(f"zstd -T0 -d -q -c '{archive}' | tar -xf -", bench.ws, bench.env)


REPO = Path(__file__).resolve().parent.parent
_RSNAP: list[str] = []


def install_rsnap(root: Path) -> str:
    """rsnap as a CI job installs it: `pip install` of this checkout (not editable) into a venv
    under root. An editable install adds a meta-path finder to every start-up, and the
    interpreter's own site-packages may carry .pth hooks; either costs every call tens of ms."""
    venv = root / "rsnap-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps",
                    str(REPO)], check=True, capture_output=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO)], check=True,
                   capture_output=True)
    return str(venv / "bin" / "rsnap")


def rsnap_executable() -> str:
    if not _RSNAP:
        raise RuntimeError("rsnap executable not chosen yet")
    return _RSNAP[0]


def rsnap(bench: realistic.Realistic, store: Path, *args: str) -> tuple[Timing, dict]:
    t, proc = timed([rsnap_executable(), *args, "--store", str(store), "--json", "--quiet"], bench.ws, bench.env)
    return t, json.loads(proc.stdout)


def ensure_zstd() -> None:
    if not shutil.which("zstd"):
        realistic.apt_install(["zstd"])


def med(timings: list[Timing]) -> dict:
    """Median wall and median cpu seconds."""
    return {"seconds": statistics.median(t.wall for t in timings),
            "cpu": statistics.median(t.cpu for t in timings)}


def tree_size(path: Path) -> tuple[int, int, int]:
    """(files, bytes, bytes counting each hard-linked inode once)."""
    stats = [p.lstat() for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    unique = {(st.st_dev, st.st_ino): st.st_size for st in stats}
    return len(stats), sum(st.st_size for st in stats), sum(unique.values())


# ---------------------------------------------------------------- the phases
# Each phase returns {row name: {"seconds", "cpu", and maybe "compiled", "bytes", ...}}.

def phase_clean_build(bench: realistic.Realistic) -> dict:
    realistic.retire(bench.target, bench.root)
    build = cargo_build(bench)
    files, size, unique = tree_size(bench.target)
    log(f"clean build {build.time.wall:.1f}s, {build.compiled} units, target {size / 2**20:.0f} MiB in {files} files")
    return {"clean_build": {**med([build.time]), "units": build.units, "compiled": build.compiled,
                            "target_files": files, "target_bytes": size, "target_unique_bytes": unique}}


def phase_full_saves(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    tar = [tar_save(bench, archive) for _ in range(repeat)]
    shutil.rmtree(store, ignore_errors=True)
    t, out = rsnap(bench, store, "save")
    log(f"full saves: tar {tar[0][0].wall:.2f}s, rsnap first save {t.wall:.2f}s")
    return {"full_tar_save": {**med([t for t, _ in tar]), "bytes": tar[-1][1]},
            "first_rsnap_save": {**med([t]), "bytes": out["bytes_written"], "files": out["files"],
                                 "reported_seconds": out["seconds"]}}


def naive_cycle(bench: realistic.Realistic, archive: Path) -> tuple[Timing, Build]:
    bench.fresh_clone()
    restore = tar_restore(bench, archive)
    return restore, cargo_build(bench)


def rsnap_cycle(bench: realistic.Realistic, store: Path) -> tuple[Timing, dict, Build]:
    bench.fresh_clone()
    restore, out = rsnap(bench, store, "restore")
    if out["result"] != "exact":
        raise RuntimeError(f"rsnap restore was not an exact hit: {out}")
    return restore, out, cargo_build(bench)


def cycle_row(restores: list[Timing], builds: list[Build]) -> dict:
    total = [Timing(r.wall + b.time.wall, r.cpu + b.time.cpu) for r, b in zip(restores, builds)]
    return {**med(total), "compiled": max(b.compiled for b in builds), "compiled_names": sorted(builds[-1].names)}


def phase_cycles(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    naive, fast = [], []
    for i in range(repeat):
        if i % 2 == 0:  # alternate which goes first, so neither always follows the other's build
            naive.append(naive_cycle(bench, archive))
            fast.append(rsnap_cycle(bench, store))
        else:
            fast.append(rsnap_cycle(bench, store))
            naive.append(naive_cycle(bench, archive))
        (nr, nb), (fr, _, fb) = naive[-1], fast[-1]
        log(f"cycle {i + 1}: naive restore {nr.wall:.2f}s + build {nb.time.wall:.2f}s ({nb.compiled} compiled); "
            f"rsnap restore {fr.wall:.2f}s + build {fb.time.wall:.2f}s ({fb.compiled} compiled)")
    outs = [o for _, o, _ in fast]
    return {
        "tar_restore": med([r for r, _ in naive]),
        "rsnap_restore": {**med([r for r, _, _ in fast]),
                          "reported_seconds": statistics.median(o["seconds"] for o in outs),
                          "files_written": outs[-1]["files_written"], "bytes_written": outs[-1]["bytes_written"],
                          "sources": outs[-1]["sources"]},
        "restore_pairs": [round(f[0].wall / n[0].wall, 3) for n, f in zip(naive, fast)],
        "naive_cycle": cycle_row([r for r, _ in naive], [b for _, b in naive]),
        "rsnap_cycle": cycle_row([r for r, _, _ in fast], [b for _, _, b in fast]),
    }


def change_cycle(bench: realistic.Realistic, archive: Path, store: Path, tag: int) -> dict:
    """CI after a one-line commit: fresh clone, rsnap restore, edit, build, then both saves."""
    bench.fresh_clone()
    rsnap(bench, store, "restore")
    bench.edit_leaf(tag)
    build = cargo_build(bench)
    if build.compiled == 0:
        raise RuntimeError("the one-line edit rebuilt nothing")
    tar_time, tar_bytes = tar_save(bench, archive)
    rsnap_time, out = rsnap(bench, store, "save")
    log(f"change {tag}: rebuild {build.time.wall:.2f}s ({build.compiled} compiled); tar save {tar_time.wall:.2f}s "
        f"{tar_bytes / 2**20:.1f} MiB; rsnap save {rsnap_time.wall:.2f}s {out['bytes_written'] / 2**20:.2f} MiB "
        f"({out['files_hashed']} files hashed)")
    return {"build": build, "tar": tar_time, "tar_bytes": tar_bytes, "rsnap": rsnap_time, "out": out}


def phase_change_saves(bench: realistic.Realistic, archive: Path, store: Path, repeat: int) -> dict:
    runs = [change_cycle(bench, archive, store, tag) for tag in range(1, repeat + 1)]
    return {
        "save_pairs": [round(r["rsnap"].wall / r["tar"].wall, 3) for r in runs],
        "change_build": {**med([r["build"].time for r in runs]), "compiled": max(r["build"].compiled for r in runs)},
        "change_tar_save": {**med([r["tar"] for r in runs]),
                            "bytes": int(statistics.median(r["tar_bytes"] for r in runs))},
        "change_rsnap_save": {**med([r["rsnap"] for r in runs]),
                              "bytes": int(statistics.median(r["out"]["bytes_written"] for r in runs)),
                              "reported_seconds": statistics.median(r["out"]["seconds"] for r in runs),
                              "files_hashed": int(statistics.median(r["out"]["files_hashed"] for r in runs))},
    }


# ---------------------------------------------------------------- report

def ratios(rows: dict) -> dict:
    def ratio(a: str, b: str, what: str = "seconds") -> float:
        return rows[a][what] / rows[b][what]
    return {
        "restore_vs_tar": ratio("rsnap_restore", "tar_restore"),
        "restore_cpu_vs_tar": ratio("rsnap_restore", "tar_restore", "cpu"),
        "cycle_speedup": ratio("clean_build", "rsnap_cycle"),
        "naive_cycle_speedup": ratio("clean_build", "naive_cycle"),
        "save_time_vs_tar": ratio("change_rsnap_save", "change_tar_save"),
        "save_cpu_vs_tar": ratio("change_rsnap_save", "change_tar_save", "cpu"),
        "save_bytes_vs_tar": ratio("change_rsnap_save", "change_tar_save", "bytes"),
        "first_save_time_vs_tar": ratio("first_rsnap_save", "full_tar_save"),
        # rsnap / tar within each cycle (both run back to back), median over cycles: robust to
        # the machine drifting during a run, which the ratio of the two medians is not
        "restore_vs_tar_paired": statistics.median(rows["restore_pairs"]),
        "save_time_vs_tar_paired": statistics.median(rows["save_pairs"]),
    }


def verdicts(r: dict) -> dict:
    out = {}
    for name, (desc, limit, cmp) in TARGETS.items():
        ok = r[name] <= limit if cmp == "<=" else r[name] >= limit
        out[name] = {"what": desc, "value": round(r[name], 3), "target": f"{cmp} {limit}", "pass": ok}
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


ROW_TITLES = {
    "clean_build": "clean build (empty target, warm CARGO_HOME)",
    "full_tar_save": "full save: tar -c target | zstd -T0",
    "first_rsnap_save": "first save: rsnap save (empty store)",
    "tar_restore": "restore target: zstd -T0 -d | tar -x",
    "rsnap_restore": "restore target: rsnap restore",
    "naive_cycle": "fresh checkout, naive: tar restore + build",
    "rsnap_cycle": "fresh checkout, rsnap: restore + build",
    "change_build": "1-line change: cargo build",
    "change_tar_save": "save after change: tar -c target | zstd -T0",
    "change_rsnap_save": "save after change: rsnap save",
}


def notes(res: dict) -> dict:
    rows, r, v = res["rows"], res["ratios"], res["verdicts"]
    mark = lambda name: "PASS" if v[name]["pass"] else "FAIL"  # noqa: E731
    own = lambda row: f"rsnap's own figure {rows[row]['reported_seconds']:.2f} s"  # noqa: E731
    return {
        "first_rsnap_save": f"{r['first_save_time_vs_tar']:.2f}x tar time; {own('first_rsnap_save')}",
        "rsnap_restore": f"{r['restore_vs_tar']:.2f}x tar (<= 1.0) {mark('restore_vs_tar')}; "
                         f"paired {r['restore_vs_tar_paired']:.2f}x; cpu {r['restore_cpu_vs_tar']:.2f}x; "
                         f"{own('rsnap_restore')}",
        "naive_cycle": f"{r['naive_cycle_speedup']:.1f}x faster than clean",
        "rsnap_cycle": f"{r['cycle_speedup']:.1f}x faster than clean (>= 10) {mark('cycle_speedup')}",
        "change_rsnap_save": f"{r['save_time_vs_tar']:.2f}x time (<= 0.25) {mark('save_time_vs_tar')}; "
                             f"paired {r['save_time_vs_tar_paired']:.2f}x; "
                             f"{100 * r['save_bytes_vs_tar']:.1f}% bytes (<= 10%) {mark('save_bytes_vs_tar')}; "
                             f"cpu {r['save_cpu_vs_tar']:.2f}x; {own('change_rsnap_save')}, "
                             f"{rows['change_rsnap_save']['files_hashed']} files hashed",
    }


def table(res: dict) -> str:
    rows, clean = res["rows"], res["rows"]["clean_build"]
    head = (f"workspace {res['workspace']}: {clean['units']} units; target {mib(clean['target_bytes'])} in {clean['target_files']} files "
            f"({mib(clean['target_unique_bytes'])} counting hard links once); {os.cpu_count()} cores; "
            f"CARGO_INCREMENTAL={res['incremental']}; one-line change: {res.get('edit_kind')}\nmedian of {res['repeat']} runs (clean build, first save: 1 run); "
            f"1-min load average {res['loadavg_start']:.1f} at start, {res['loadavg_end']:.1f} at end")
    lines = [head, "", f"{'step':<46} {'seconds':>8} {'cpu s':>7} {'compiled':>8} {'written':>10}  vs target",
             "-" * 130]
    row_notes = notes(res)
    for name, title in ROW_TITLES.items():
        row = rows[name]
        size = mib(row["bytes"]) if "bytes" in row else ""
        lines.append(f"{title:<46} {row['seconds']:>8.2f} {row['cpu']:>7.2f} {str(row.get('compiled', '')):>8} "
                     f"{size:>10}  {row_notes.get(name, '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def run_benchmark(root: Path, repeat: int, incremental: bool | None = None, args=None) -> dict:
    ensure_zstd()
    extra_env = {} if incremental is None else {"CARGO_INCREMENTAL": str(int(incremental))}
    if args is not None and args.project:
        log(f"cloning {args.project} under {root}")
        bench = project.setup(root, args.project, args.cargo_home, args.edit, extra_env)
    elif args is not None and args.debian_crate:
        log(f"making a project of Debian's {args.debian_crate} crate under {root}")
        bench = debian_project.setup(root, args.debian_crate, args.edit, extra_env)
    else:
        log(f"setting up the realistic workspace under {root}")
        bench = realistic.setup(root, extra_env=extra_env)
    if args is not None and args.edit_kind:
        bench.edit_kind = args.edit_kind
    archive, store = root / "target.tar.zst", root / "store"
    try:
        res = {"repeat": repeat, "root": str(root), "workspace": str(getattr(bench, "origin", bench.ws)), "incremental": extra_env.get("CARGO_INCREMENTAL", "default"),
               "rsnap": rsnap_executable(), "edit_kind": bench.edit_kind, "loadavg_start": os.getloadavg()[0]}
        res["rows"] = rows = {}
        rows.update(phase_clean_build(bench))
        rows.update(phase_full_saves(bench, archive, store, repeat))
        rows.update(phase_cycles(bench, archive, store, repeat))
        rows.update(phase_change_saves(bench, archive, store, repeat))
    finally:
        bench.stop()
    res["loadavg_end"] = os.getloadavg()[0]
    res["ratios"] = {k: round(v, 4) for k, v in ratios(res["rows"]).items()}
    res["verdicts"] = verdicts(res["ratios"])
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="work dir (default $RSNAP_BENCH_DIR, else /tmp/rsnap-bench, "
                        "or /tmp/rsnap-bench-project with --project)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    parser.add_argument("--incremental", action=argparse.BooleanOptionalAction, default=None,
                        help="set CARGO_INCREMENTAL=1/0 for every build (default: cargo's default, on for dev)")
    parser.add_argument("--project", type=Path, help="benchmark this git repository of a Rust project instead of "
                        "the bundled realistic workspace (see bench/project.py)")
    parser.add_argument("--debian-crate", metavar="NAME[-VERSION]", help="benchmark one real crate from "
                        "/usr/share/cargo/registry as a project (see bench/debian_project.py)")
    parser.add_argument("--cargo-home", type=Path, help="with --project: CARGO_HOME (default $CARGO_HOME or ~/.cargo)")
    parser.add_argument("--edit", help="with --project: file (relative to the repository) that gets the one-line "
                        "change (default: the root package's src/main.rs or src/lib.rs)")
    parser.add_argument("--edit-kind", choices=["const", "comment", "code"],
                        help="the one-line change: a constant's value (default for the bundled workspace), a "
                        "comment (default with --project), or new code (one more statement or function each time)")
    parser.add_argument("--rsnap", help="the rsnap executable to time (default: this checkout, pip-installed into a "
                        "venv under the work dir, as a CI job would install it)")
    args = parser.parse_args(argv)
    as_project = bool(args.project or args.debian_crate)
    if args.project and args.debian_crate:
        parser.error("--project and --debian-crate exclude each other")
    if args.edit_kind and args.edit_kind != "code" and args.edit_kind != ("comment" if as_project else "const"):
        parser.error(f"--edit-kind {args.edit_kind} is only for {'the bundled workspace' if as_project else '--project'}")
    default_root = "/tmp/rsnap-bench-project" if as_project else "/tmp/rsnap-bench"
    root = args.root or Path(os.environ.get("RSNAP_BENCH_DIR", default_root))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.rsnap:
        _RSNAP.append(str(Path(args.rsnap).resolve()))
    else:
        log(f"installing this checkout of rsnap into {root / 'rsnap-venv'}")
        _RSNAP.append(install_rsnap(root))
    res = run_benchmark(root, args.repeat, args.incremental, args)
    print(table(res), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    return 0 if all(v["pass"] for v in res["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
