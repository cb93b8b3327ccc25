"""rsnap over S3 vs rust-cache's model (tarball + one PUT + one GET), on the realistic workspace.

    python bench/bench_s3.py [--root DIR] [--latency 0.02] [--bandwidth 100e6]

moto's standalone server on 127.0.0.1 behind the fault proxy (tests/fault_proxy.py), which
adds `--latency` per request and caps bodies at `--bandwidth` bytes/s (a CI runner talking
to a regional bucket) and counts requests and bytes. Rows: first save; save after a
one-line change in the leaf crate (bytes, requests, seconds); cold restore into an empty
target; restore onto the older target (the one before the change); beside them
`tar | zstd -T0` + one PUT, and one GET + `zstd -d | tar -x`. The tarball goes through the
same client (OpenDAL, multipart for big objects) and proxy. moto is a Python server: its
own per-request cost is part of every figure, which favours the one-big-object path.
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
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import realistic  # noqa: E402
from fault_proxy import ProxyProcess  # noqa: E402
from s3_util import MotoServer  # noqa: E402

BUCKET = "rsnap-bench"


def log(msg: str) -> None:
    print(f"[bench_s3] {msg}", file=sys.stderr, flush=True)


def sh(script: str, cwd: Path, env: dict) -> float:
    t = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=cwd, env=env, check=True)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/rsnap-bench-s3")
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--bandwidth", type=float, default=100e6)
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log(f"setting up the realistic workspace under {root}")
    bench = realistic.setup(root)
    server = MotoServer.start()
    proxy = ProxyProcess(server.port)
    rows: dict[str, dict] = {}
    try:
        server.create_bucket(BUCKET)
        aws = {k: v for k, v in server.env(proxy.endpoint).items() if k.startswith("AWS_")}
        url = f"s3://{BUCKET}/bench"
        env = {**bench.env, **aws, "RSNAP_STORE": url, "RSNAP_CACHE_SYNC": "0",
               "XDG_CACHE_HOME": str(root / "xdg-cache")}
        env.pop("CI", None)
        os.environ.update(aws)

        def rsnap(*a: str) -> tuple[float, dict, dict]:
            proxy.reset_stats()
            t = time.monotonic()
            p = subprocess.run([sys.executable, "-m", "rsnap", *a, "--json"], cwd=bench.ws, env=env,
                               capture_output=True, text=True)
            dt = time.monotonic() - t
            if p.returncode:
                raise SystemExit(f"rsnap {' '.join(a)} failed: {p.stderr}")
            st = proxy.reset_stats()
            return dt, json.loads(p.stdout), {"requests": sum(st.requests.values()), "by_method": dict(st.requests),
                                              "bytes_up": st.bytes_in, "bytes_down": st.bytes_out}

        log("clean build")
        realistic.retire(bench.target, bench.root)
        t = time.monotonic()
        subprocess.run(["cargo", "build", "-q"], cwd=bench.ws, env=bench.env, check=True)
        rows["clean build"] = {"seconds": round(time.monotonic() - t, 2)}
        old_target = root / "target-before-change"
        shutil.rmtree(old_target, ignore_errors=True)
        subprocess.run(["cp", "-a", str(bench.target), str(old_target)], check=True)
        proxy.set(latency=args.latency, bandwidth=args.bandwidth)

        log("first save")
        dt, out, net = rsnap("save")
        rows["rsnap first save"] = {"seconds": round(dt, 2), **net}

        log("tarball: tar | zstd -T0, one PUT")
        archive = root / "target.tar.zst"
        tar_s = sh(f"tar -cf - target | zstd -T0 -q -f -o '{archive}'", bench.ws, env)
        from rsnap.store.s3 import S3Store
        s3 = S3Store(url)
        data = archive.read_bytes()
        proxy.reset_stats()
        t = time.monotonic()
        s3.put("tarball/target.tar.zst", data)
        put_s = time.monotonic() - t
        st = proxy.reset_stats()
        rows["tarball save (tar|zstd + PUT)"] = {"seconds": round(tar_s + put_s, 2), "tar_zstd_s": round(tar_s, 2),
                                                 "put_s": round(put_s, 2), "requests": sum(st.requests.values()),
                                                 "bytes_up": st.bytes_in}

        log("one-line change, build, save")
        bench.edit_leaf(1)
        subprocess.run(["cargo", "build", "-q"], cwd=bench.ws, env=bench.env, check=True)
        dt, out, net = rsnap("save")
        rows["rsnap save after a one-line change"] = {"seconds": round(dt, 2), **net,
                                                      "packs_written": out["packs_written"]}

        log("cold restore into an empty target")
        realistic.retire(bench.target, bench.root)
        dt, out, net = rsnap("restore")
        assert out["result"] == "exact", out
        rows["rsnap cold restore"] = {"seconds": round(dt, 2), **net, "files_written": out["files_written"]}
        check = subprocess.run(["cargo", "build", "--message-format=json", "-q"], cwd=bench.ws, env=bench.env,
                               capture_output=True, text=True, check=True)
        dirty = [json.loads(l)["target"]["name"] for l in check.stdout.splitlines()
                 if l.startswith("{") and json.loads(l).get("reason") == "compiler-artifact" and not json.loads(l)["fresh"]]
        rows["rsnap cold restore"]["units_compiled_after"] = len(dirty)

        log("restore onto the older target")
        realistic.retire(bench.target, bench.root)
        subprocess.run(["cp", "-a", str(old_target), str(bench.target)], check=True)
        dt, out, net = rsnap("restore")
        rows["rsnap restore onto older target"] = {"seconds": round(dt, 2), **net, "files_written": out["files_written"]}

        log("tarball: one GET, zstd -d | tar -x")
        realistic.retire(bench.target, bench.root)
        proxy.reset_stats()
        t = time.monotonic()
        got = s3.get("tarball/target.tar.zst")
        get_s = time.monotonic() - t
        st = proxy.reset_stats()
        archive.write_bytes(got)
        untar_s = sh(f"zstd -T0 -d -q -c '{archive}' | tar -xf -", bench.ws, env)
        rows["tarball restore (GET + untar)"] = {"seconds": round(get_s + untar_s, 2), "get_s": round(get_s, 2),
                                                 "untar_s": round(untar_s, 2), "requests": sum(st.requests.values()),
                                                 "bytes_down": st.bytes_out}
    finally:
        proxy.stop()
        server.stop()
        bench.stop()
    tar_save, tar_get = rows["tarball save (tar|zstd + PUT)"], rows["tarball restore (GET + untar)"]
    change, cold = rows["rsnap save after a one-line change"], rows["rsnap cold restore"]
    ratios = {
        "save after change / tarball save, time (target <= 0.15)": round(change["seconds"] / tar_save["seconds"], 3),
        "save after change / tarball save, bytes (target <= 0.10)": round(change["bytes_up"] / tar_save["bytes_up"], 3),
        "cold restore / tarball GET + untar, time (target <= 1.0)": round(cold["seconds"] / tar_get["seconds"], 3),
        "restore onto older target / tarball GET + untar, time":
            round(rows["rsnap restore onto older target"]["seconds"] / tar_get["seconds"], 3),
    }
    print(json.dumps({"latency_s": args.latency, "bandwidth_Bps": args.bandwidth, "rows": rows, "ratios": ratios},
                     indent=1))
    for name, r in rows.items():
        print(f"{name:40s} {r.get('seconds', ''):>7}s  up {r.get('bytes_up', 0) / 2**20:8.1f} MiB  "
              f"down {r.get('bytes_down', 0) / 2**20:8.1f} MiB  requests {r.get('requests', '')}")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
