"""A damaged local store: what a restore costs before and after damage handling (issue 20).

    python bench/bench_damage.py [--root DIR] [--before /path/to/older/rsnap/checkout] [--kinds local,s3]

The realistic workspace (bench/realistic.py) is built clean (units and seconds counted) and
saved into a local store. Then, for the largest pack deleted and for it corrupted (a byte
flipped every 64 KiB), and for each rsnap checkout (--before, default none, and this one): a
cold runner (fresh clone, CARGO_HOME's registry/ and git/ wiped) runs `rsnap restore` and
`cargo build`; the row gives the restore's exit code and seconds, what it reported as damaged,
the units cargo compiled (--message-format=json, fresh: false) and the build's seconds.
With `s3` among --kinds the same store is also copied, object by object, into a bucket of a
moto server on loopback (tests/s3_util.py) and damaged there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import realistic  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_damage] {msg}", file=sys.stderr, flush=True)


def cargo_build(bench) -> tuple[list[str], int, float]:
    """(packages of the units compiled, units in all, seconds) of `cargo build`."""
    t = time.monotonic()
    proc = subprocess.run(["cargo", "build", "--message-format=json"], cwd=bench.ws, env=bench.env,
                          capture_output=True, text=True, check=True)
    seconds = time.monotonic() - t
    units = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    units = [u for u in units if u.get("reason") == "compiler-artifact"]
    return sorted(u["package_id"].split("#")[-1] for u in units if not u["fresh"]), len(units), seconds


def rsnap(bench, code: Path, store, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**bench.env, "PYTHONPATH": str(code), "RSNAP_STORE": str(store), **(env or {})}
    env.pop("CI", None)
    return subprocess.run([sys.executable, "-m", "rsnap", *args], cwd=bench.ws, env=env, capture_output=True, text=True)


def cold_runner(bench) -> None:
    bench.fresh_clone()
    for sub in ("registry", "git"):
        shutil.rmtree(bench.cargo_home / sub, ignore_errors=True)


def damage(store: Path, how: str) -> str:
    largest = max((p for p in (store / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "deleted":
        largest.unlink()
    else:
        data = bytearray(largest.read_bytes())
        for i in range(len(data) // 2 % 65536, len(data), 65536):
            data[i] ^= 0x55
        largest.write_bytes(bytes(data))
    return largest.name


class Bucket:
    """The saved store's objects in a moto bucket, and the environment rsnap runs with."""

    def __init__(self, moto, name: str, source: Path):
        moto.create_bucket(name)
        self.url = f"s3://{name}/ci"
        self.env = {k: v for k, v in moto.env().items() if k.startswith("AWS_")}
        self.env["RSNAP_CACHE_SYNC"] = "0"
        os.environ.update(self.env)
        from rsnap.store import open_store
        self.store = open_store(self.url)
        for p in source.rglob("*"):
            rel = p.relative_to(source).as_posix()
            if p.is_file() and rel.split("/")[0] in ("packs", "snapshots"):
                self.store.put(rel, p.read_bytes())

    def damage(self, how: str) -> str:
        name, _size = max(((n, s) for n, s, _m in self.store.stat_all("packs/")), key=lambda t: t[1])
        if how == "deleted":
            self.store.delete(name)
        else:
            data = bytearray(self.store.get(name))
            for i in range(len(data) // 2 % 65536, len(data), 65536):
                data[i] ^= 0x55
            self.store.put(name, bytes(data))
        return name.rsplit("/", 1)[-1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/rsnap-bench-damage")
    ap.add_argument("--before", help="an rsnap checkout without damage handling, measured too")
    ap.add_argument("--kinds", default="local,s3", help="stores to damage: local, s3 (comma-separated)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    after = HERE.parent
    log(f"setting up the realistic workspace under {root}")
    bench = realistic.setup(root)
    rows = []
    try:
        compiled, total, seconds = cargo_build(bench)
        rows.append({"case": "clean build", "units_compiled": len(compiled), "units": total, "build_s": round(seconds, 1)})
        store = root / "store"
        shutil.rmtree(store, ignore_errors=True)
        rsnap(bench, after, store, "save", "--json").check_returncode()
        packs = sorted((p.stat().st_size for p in (store / "packs").rglob("*") if p.is_file()), reverse=True)
        log(f"saved: {len(packs)} packs, largest {packs[0] >> 20} MiB")
        versions = [("before", Path(args.before))] if args.before else []
        moto = None
        if "s3" in kinds:
            from s3_util import MotoServer
            moto = MotoServer.start()
        for kind, how in [(k, h) for k in kinds for h in ("deleted", "corrupt")]:
            if kind == "s3":
                bucket = Bucket(moto, f"damage-{how}", store)
                damaged, extra = bucket.url, bucket.env
                pack = bucket.damage(how)
            else:
                damaged, extra = root / f"store-{how}", {}
                shutil.rmtree(damaged, ignore_errors=True)
                shutil.copytree(store, damaged)
                pack = damage(damaged, how)
            for label, code in [*versions, ("after", after)]:
                cold_runner(bench)
                t = time.monotonic()
                res = rsnap(bench, code, damaged, "restore", "--json", env=extra)
                restore_s = time.monotonic() - t
                try:
                    out = json.loads(res.stdout)
                except ValueError:
                    out = {}
                compiled, total, seconds = cargo_build(bench)
                rows.append({"case": f"{kind}: largest pack {how} ({pack[:8]}, {len(packs)} packs)", "rsnap": label,
                             "restore_exit": res.returncode, "restore_s": round(restore_s, 2),
                             "result": out.get("result", "error"), "damaged": out.get("damaged"),
                             "units_compiled": len(compiled), "units": total, "build_s": round(seconds, 1),
                             "compiled": compiled if len(compiled) < total else "all"})
                log(json.dumps(rows[-1]))
        if moto is not None:
            moto.stop()
    finally:
        bench.stop()
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
