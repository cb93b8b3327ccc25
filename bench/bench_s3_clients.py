#!/usr/bin/env python3
"""Compare S3 client libraries for rsnap's s3:// store against moto's server on loopback.

For each of opendal, obstore and boto3: start-up (import, client creation, first HEAD, in
fresh `python -c` processes, median), parallel PUT and GET throughput, small range reads of
one object, and a multipart upload (whose request counts are checked through the counting
proxy of tests/fault_proxy.py). moto is a Python server, so absolute throughput is moto's
ceiling on this machine; the comparison between the clients is what counts.

    python bench/bench_s3_clients.py [--objects 32] [--size-mib 4] [--jobs 8] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3_util import MotoServer  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402

BUCKET = "bench"
MIB = 1 << 20

# Start-up probes: import, make a client from the standard AWS environment, HEAD one object.
STARTUP = {
    "opendal": ("import opendal",
                "c = opendal.Operator('s3', bucket='bench', root='/p')",
                "c.stat('probe')"),
    "obstore": ("import obstore; from obstore.store import S3Store",
                "c = S3Store('bench', prefix='p', client_options={'allow_http': True})",
                "obstore.head(c, 'probe')"),
    "boto3": ("import boto3",
              "c = boto3.client('s3')",
              "c.head_object(Bucket='bench', Key='p/probe')"),
}
PROBE = """
import time; t0 = time.perf_counter()
{0}
t1 = time.perf_counter()
{1}
t2 = time.perf_counter()
{2}
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


class Client:
    """The same five operations over each library."""

    def __init__(self, lib: str, jobs: int):
        self.lib = lib
        if lib == "opendal":
            import opendal
            self.c = opendal.Operator("s3", bucket=BUCKET, root="/p")
        elif lib == "obstore":
            from obstore.store import S3Store
            self.c = S3Store(BUCKET, prefix="p", client_options={"allow_http": True})
        else:
            import boto3
            from botocore.config import Config
            self.c = boto3.client("s3", config=Config(max_pool_connections=jobs))

    def put(self, key: str, data: bytes) -> None:
        if self.lib == "opendal":
            self.c.write(key, data)
        elif self.lib == "obstore":
            import obstore
            obstore.put(self.c, key, data, use_multipart=False)
        else:
            self.c.put_object(Bucket=BUCKET, Key="p/" + key, Body=data)

    def get(self, key: str) -> bytes:
        if self.lib == "opendal":
            return self.c.read(key)
        if self.lib == "obstore":
            import obstore
            return obstore.get(self.c, key).bytes()
        return self.c.get_object(Bucket=BUCKET, Key="p/" + key)["Body"].read()

    def get_range(self, key: str, off: int, n: int) -> bytes:
        if self.lib == "opendal":
            return self.c.read(key, offset=off, size=n)
        if self.lib == "obstore":
            import obstore
            return obstore.get_range(self.c, key, start=off, length=n)
        r = self.c.get_object(Bucket=BUCKET, Key="p/" + key, Range=f"bytes={off}-{off + n - 1}")
        return r["Body"].read()

    def put_multipart(self, key: str, data: bytes, part: int, jobs: int) -> None:
        if self.lib == "opendal":
            self.c.write(key, data, chunk=part, concurrent=jobs)
        elif self.lib == "obstore":
            import obstore
            obstore.put(self.c, key, data, chunk_size=part, max_concurrency=jobs)
        else:
            import io
            from boto3.s3.transfer import TransferConfig
            cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                 max_concurrency=jobs)
            self.c.upload_fileobj(io.BytesIO(data), BUCKET, "p/" + key, Config=cfg)


def startup(lib: str, env: dict, runs: int) -> tuple[float, float, float, float]:
    """Medians (ms) of import, client creation, first HEAD, and the whole process."""
    rows = []
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE.format(*STARTUP[lib])], env=env,
                             capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t
        rows.append([float(x) * 1e3 for x in out.split()] + [wall * 1e3])
    return tuple(statistics.median(col) for col in zip(*rows))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(lib: str, args, env: dict, server: MotoServer) -> dict:
    os.environ.update(env)
    server.reset()
    server.create_bucket(BUCKET)
    cl = Client(lib, args.jobs)
    cl.put("probe", b"x")
    r = {"lib": lib}
    r["import"], r["client"], r["head"], r["process"] = startup(lib, env, args.runs)

    size = args.size_mib * MIB
    blobs = [random.randbytes(size) for _ in range(4)]  # 4 distinct payloads, reused
    keys = [f"obj/{i:04d}" for i in range(args.objects)]
    total = size * args.objects
    with ThreadPoolExecutor(args.jobs) as pool:
        r["put"] = total / timed(lambda: list(pool.map(lambda i: cl.put(keys[i], blobs[i % 4]),
                                                       range(args.objects)))) / MIB
        got = []
        r["get"] = total / timed(lambda: got.extend(pool.map(cl.get, keys))) / MIB
        assert all(bytes(g) == blobs[i % 4] for i, g in enumerate(got)), f"{lib}: GET mismatch"
        got.clear()

        big = random.randbytes(16 * MIB)
        cl.put("big16", big)
        rng = random.Random(1)
        ranges = [(rng.randrange(0, len(big) - 65536), rng.choice([4096, 16384, 65536]))
                  for _ in range(args.ranges)]
        res = []
        dt = timed(lambda: res.extend(pool.map(lambda a: cl.get_range("big16", *a), ranges)))
        assert all(bytes(b) == big[o:o + n] for b, (o, n) in zip(res, ranges)), f"{lib}: range"
        r["ranges"] = len(ranges) / dt

    mp = random.randbytes(args.multipart_mib * MIB)
    r["multipart"] = timed(lambda: cl.put_multipart("mp", mp, 8 * MIB, 4))
    assert bytes(cl.get("mp")) == mp, f"{lib}: multipart mismatch"
    # the same upload through the counting proxy: was it really multipart?
    proxy = FaultProxy(server.port).start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        Client(lib, args.jobs).put_multipart("mp2", mp, 8 * MIB, 4)
        s = proxy.stats()
        r["mp_requests"] = f"{s.requests['POST']} POST + {s.requests['PUT']} PUT"
    finally:
        os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
        proxy.stop()
    return r


def baseline(runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=32)
    ap.add_argument("--size-mib", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--ranges", type=int, default=200)
    ap.add_argument("--multipart-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per start-up figure")
    ap.add_argument("--libs", default="opendal,obstore,boto3")
    args = ap.parse_args()

    server = MotoServer.start()
    try:
        env = server.env()
        results = [bench(lib, args, env, server) for lib in args.libs.split(",")]
    finally:
        server.stop()
    print(f"moto on loopback; {args.objects} x {args.size_mib} MiB objects, {args.jobs} threads; "
          f"{args.ranges} ranges of 4-64 KiB in a 16 MiB object; multipart {args.multipart_mib} MiB "
          f"in 8 MiB parts x4; start-up = median of {args.runs} fresh processes "
          f"(`python -c pass` alone: {baseline(args.runs):.0f} ms)")
    hdr = ("library", "import ms", "client ms", "1st HEAD ms", "process ms", "PUT MiB/s",
           "GET MiB/s", "ranges/s", "multipart s", "multipart requests")
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for r in results:
        print(f"{r['lib']} | {r['import']:.1f} | {r['client']:.1f} | {r['head']:.1f} | "
              f"{r['process']:.0f} | {r['put']:.0f} | {r['get']:.0f} | {r['ranges']:.0f} | "
              f"{r['multipart']:.2f} | {r['mp_requests']}")


if __name__ == "__main__":
    main()
