"""rsnap on the GitHub Actions cache (gha://) vs one tarball entry per key (rust-cache's model), on
the realistic workspace, side by side in one run.

    python bench/bench_gha.py [--root DIR] [--latency 0.05] [--bandwidth 100e6] [--commits 20]

The cache service is the tests' stand-in (tests/gha_server.py: GitHub's twirp API in front of
Azurite), modelling a hosted runner: `--latency` s per request (API call or blob request) and
`--bandwidth` bytes/s for blobs, shared by all requests in flight. Each side has its own service
(its own counters and budget). The tarball side is GitHub's own client, @actions/cache
(tests/node/actions_cache.mjs: tar + zstd, one CreateCacheEntry, Azure block upload, finalize;
restore: lookup, download, untar) saving target/ and CARGO_HOME, the same trees rsnap saves.
Entries are immutable, so keeping the tarball current means a new key (e.g. the run id) per run.

Rows: first save; save after a one-line change in the leaf crate (seconds, bytes, entries
created); cold restore into an empty target and CARGO_HOME (then cargo must compile nothing);
a week of `--commits` commits (edit, build, save): total bytes uploaded, entries created and the
cache budget used at the end (every entry is younger than GitHub's 7-day eviction).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import realistic  # noqa: E402
from gha_server import NODE_DIR, Azurite, CacheServer, node_missing  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_gha] {msg}", file=sys.stderr, flush=True)


class Side:
    """One cache service and what it counted since the last `take()`."""

    def __init__(self, azurite, latency: float, bandwidth: float):
        self.server = CacheServer(azurite)
        self.server.latency, self.server.bandwidth = latency, bandwidth
        self._last = self.server.counts.copy()

    def take(self) -> dict:
        now = self.server.counts.copy()
        d, self._last = now - self._last, now
        return {"bytes_up": d["bytes_up"], "bytes_down": d["bytes_down"],
                "entries_created": d["FinalizeCacheEntryUpload"],
                "api_calls": sum(d[m] for m in ("CreateCacheEntry", "FinalizeCacheEntryUpload", "GetCacheEntryDownloadURL")),
                "blob_requests": sum(v for k, v in d.items() if k.startswith("blob_"))}

    def budget(self) -> dict:
        entries = self.server.entries()
        return {"entries": len(entries), "bytes": sum(e["size"] for e in entries)}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {p.stderr[-2000:]}")
    return time.monotonic() - t, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/rsnap-bench-gha")
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--bandwidth", type=float, default=100e6)
    ap.add_argument("--commits", type=int, default=20)
    args = ap.parse_args()
    if node_missing():
        raise SystemExit(node_missing())
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log(f"setting up the realistic workspace under {root}")
    bench = realistic.setup(root)
    azurite = Azurite.start()
    gha, tar = Side(azurite, args.latency, args.bandwidth), Side(azurite, args.latency, args.bandwidth)
    rows: dict[str, dict] = {}
    runner_temp = root / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    try:
        env = {**bench.env, **gha.server.env(), "RSNAP_STORE": "gha://bench", "XDG_CACHE_HOME": str(root / "xdg-cache"),
               "PYTHONPATH": str(HERE.parent)}
        env.pop("CI", None)
        tar_env = {**bench.env, **tar.server.env(), "RUNNER_TEMP": str(runner_temp)}
        trees = f"{bench.target}\n{bench.cargo_home / 'registry'}\n{bench.cargo_home / 'git'}"

        def rsnap(*a: str) -> tuple[float, dict, dict]:
            gha.take()
            dt, out = timed([sys.executable, "-m", "rsnap", *a, "--json"], bench.ws, env)
            return dt, json.loads(out), gha.take()

        def tarball(mode: str, key: str) -> tuple[float, dict]:
            tar.take()
            dt, out = timed(["node", str(NODE_DIR / "actions_cache.mjs"), mode, key, trees], bench.ws, tar_env)
            result = out.rsplit("result=", 1)[-1].strip()
            if result in ("", "-1"):
                raise SystemExit(f"@actions/cache {mode} {key} did nothing: {out[-1000:]}")
            return dt, tar.take()

        def build() -> float:
            return timed(["cargo", "build", "-q"], bench.ws, bench.env)[0]

        log("clean build")
        realistic.retire(bench.target, bench.root)
        rows["clean build"] = {"seconds": round(build(), 2)}

        log("first save: rsnap, then the tarball")
        dt, out, net = rsnap("save")
        rows["rsnap first save"] = {"seconds": round(dt, 2), **net}
        dt, net = tarball("save", "tarball-run-0")
        rows["tarball first save"] = {"seconds": round(dt, 2), **net}

        log("one-line change, build, save")
        bench.edit_leaf(1)
        build()
        dt, out, net = rsnap("save")
        rows["rsnap save after a one-line change"] = {"seconds": round(dt, 2), **net, "packs_written": out["packs_written"]}
        dt, net = tarball("save", "tarball-run-1")
        rows["tarball save after a one-line change"] = {"seconds": round(dt, 2), **net}

        for side in ("rsnap", "tarball"):
            log(f"cold restore ({side}) into an empty target and CARGO_HOME")
            realistic.retire(bench.target, bench.root)
            for sub in ("registry", "git"):     # CARGO_HOME's caches (its config stays: the loopback registry)
                realistic.retire(bench.cargo_home / sub, bench.root)
            if side == "rsnap":
                dt, out, net = rsnap("restore")
                assert out["result"] == "exact", out
            else:
                dt, net = tarball("restore", "tarball-run-1")
            check = subprocess.run(["cargo", "build", "--message-format=json", "-q"], cwd=bench.ws, env=bench.env,
                                   capture_output=True, text=True, check=True)
            dirty = [m for m in map(json.loads, filter(None, check.stdout.splitlines()))
                     if m.get("reason") == "compiler-artifact" and not m["fresh"]]
            rows[f"{side} cold restore"] = {"seconds": round(dt, 2), **net, "units_compiled_after": len(dirty)}

        log(f"a week of {args.commits} commits: edit, build, save (rsnap and a new tarball key each)")
        week = {"rsnap": {"seconds": 0.0, "bytes_up": 0, "entries_created": 0},
                "tarball": {"seconds": 0.0, "bytes_up": 0, "entries_created": 0}}
        for i in range(args.commits):
            bench.edit_leaf(100 + i)
            build()
            dt, _out, net = rsnap("save")
            tdt, tnet = tarball("save", f"tarball-run-{2 + i}")
            for side, s, n in (("rsnap", dt, net), ("tarball", tdt, tnet)):
                week[side]["seconds"] += s
                week[side]["bytes_up"] += n["bytes_up"]
                week[side]["entries_created"] += n["entries_created"]
        for side, s in (("rsnap", gha), ("tarball", tar)):
            rows[f"{side} week of {args.commits} commits"] = {**week[side], "seconds": round(week[side]["seconds"], 1),
                                                              "cache_budget_at_end": s.budget()}
    finally:
        gha.server.stop()
        tar.server.stop()
        azurite.stop()
        bench.stop()
    r = rows
    ratios = {
        "save after change / tarball, time (target <= 0.2)":
            round(r["rsnap save after a one-line change"]["seconds"] / r["tarball save after a one-line change"]["seconds"], 3),
        "save after change / tarball, bytes (target <= 0.10)":
            round(r["rsnap save after a one-line change"]["bytes_up"] / r["tarball save after a one-line change"]["bytes_up"], 3),
        "cold restore / tarball download + untar, time (target <= 1.0)":
            round(r["rsnap cold restore"]["seconds"] / r["tarball cold restore"]["seconds"], 3),
        f"week of {args.commits}: bytes uploaded, rsnap / tarball":
            round(r[f"rsnap week of {args.commits} commits"]["bytes_up"] / r[f"tarball week of {args.commits} commits"]["bytes_up"], 3),
        f"week of {args.commits}: cache budget at the end, rsnap / tarball":
            round(r[f"rsnap week of {args.commits} commits"]["cache_budget_at_end"]["bytes"]
                  / r[f"tarball week of {args.commits} commits"]["cache_budget_at_end"]["bytes"], 3),
    }
    print(json.dumps({"latency_s": args.latency, "bandwidth_Bps": args.bandwidth, "rows": rows, "ratios": ratios}, indent=1))
    for name, row in rows.items():
        budget = row.get("cache_budget_at_end")
        print(f"{name:40s} {row.get('seconds', ''):>7}s  up {row.get('bytes_up', 0) / 1e6:8.1f} MB  "
              f"down {row.get('bytes_down', 0) / 1e6:8.1f} MB  entries {row.get('entries_created', '')}"
              + (f"  budget {budget['bytes'] / 1e6:.1f} MB in {budget['entries']} entries" if budget else ""))
    for k, v in ratios.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
