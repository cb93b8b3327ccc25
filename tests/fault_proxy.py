"""A loopback HTTP proxy between a client and the S3 server that counts and breaks things.

    proxy = ProxyProcess(upstream_port)              # proxy.endpoint = "http://127.0.0.1:PORT"
    proxy.inject("503", times=2, method="PUT")        # next 2 PUTs get 503 SlowDown
    proxy.set(latency=0.02, bandwidth=100e6)          # per request; bytes/s for bodies
    st = proxy.stats(); st.requests["PUT"], st.bytes_in, st.bytes_out
    proxy.stop()

ProxyProcess runs the proxy in its own process (`python fault_proxy.py UPSTREAM_PORT`),
controlled over HTTP at /_proxy/… on its own port: a client in the test process that holds
the GIL while it waits on a socket (opendal's blocking lister does) cannot starve it.
FaultProxy is the same proxy in-process, with the same methods, for clients that never do.

Faults (each consumed by the next matching request, `times` times; times=None: forever):
  drop      read the request, then reset the connection without an answer
  503       S3 `SlowDown` XML error          500   S3 `InternalError` XML error
  403       S3 `AccessDenied` XML error      404   S3 `NoSuchBucket` XML error
  truncate  forward, then send only half the body under the full Content-Length and close
  stall     forward, then send half the body under the full Content-Length and go silent
            (the connection stays open for 120 s): a hung network mid-transfer
Counting covers every request the proxy receives, faulted or not: requests by method,
request body bytes in, response body bytes out, and a log of (method, path, status).
`seen_keys` holds the access key ids in the requests' SigV4 Authorization headers.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
          "500": (500, "InternalError", "We encountered an internal error. Please try again."),
          "403": (403, "AccessDenied", "Access Denied"),
          "404": (404, "NoSuchBucket", "The specified bucket does not exist")}
FAULTS = set(ERRORS) | {"drop", "truncate", "stall"}
_CRED = re.compile(r"Credential=([^/,\s]+)/")


class Stats:
    def __init__(self):
        self.requests: Counter = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.log: list[tuple[str, str, int]] = []
        self.seen_keys: set[str] = set()

    def puts(self, prefix: str = "") -> list[str]:
        """Paths of the PUT requests (object uploads and parts) under a path prefix."""
        return [p for m, p, s in self.log if m == "PUT" and p.split("?")[0].startswith(prefix)]

    def to_json(self) -> dict:
        return {"requests": dict(self.requests), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "log": self.log, "seen_keys": sorted(self.seen_keys)}

    @classmethod
    def from_json(cls, d: dict) -> "Stats":
        s = cls()
        s.requests.update(d["requests"])
        s.bytes_in, s.bytes_out = d["bytes_in"], d["bytes_out"]
        s.log = [tuple(x) for x in d["log"]]
        s.seen_keys = set(d["seen_keys"])
        return s


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.latency = 0.0           # seconds added before each answer
        self.bandwidth = None        # bytes/s cap on request and response bodies
        self._stats = Stats()
        self._faults: list[list] = []  # [fault, times_left, method, path_substring]
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def inject(self, fault: str, times: int | None = 1, method: str | None = None,
               path: str | None = None) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {sorted(FAULTS)}")
        with self._lock:
            self._faults.append([fault, times, method, path])

    def set(self, latency: float | None = None, bandwidth: float | None = None) -> None:
        if latency is not None:
            self.latency = latency
        if bandwidth is not None:
            self.bandwidth = bandwidth or None

    def clear(self) -> None:
        """Drop pending faults, latency and bandwidth cap; keep counting."""
        with self._lock:
            self._faults.clear()
        self.latency, self.bandwidth = 0.0, None

    def stats(self) -> Stats:
        return self._stats

    def reset_stats(self) -> Stats:
        old, self._stats = self._stats, Stats()
        return old

    def control(self, verb: str, q: dict) -> dict:
        """The /_proxy/<verb>?… API that ProxyProcess speaks."""
        if verb == "inject":
            times = q.get("times", "1")
            self.inject(q["fault"], None if times == "none" else int(times), q.get("method"), q.get("path"))
        elif verb == "set":
            self.set(*(float(q[k]) if k in q else None for k in ("latency", "bandwidth")))
        elif verb == "clear":
            self.clear()
        elif verb == "reset_stats":
            return self.reset_stats().to_json()
        return self._stats.to_json()

    def _take_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for f in self._faults:
                if (f[2] is None or f[2] == method) and (f[3] is None or f[3] in path):
                    if f[1] is not None:
                        f[1] -= 1
                        if f[1] <= 0:
                            self._faults.remove(f)
                    return f[0]
        return None

    def _count(self, method, path, status, nin, nout):
        with self._lock:
            s = self._stats
            s.requests[method] += 1
            s.bytes_in += nin
            s.bytes_out += nout
            s.log.append((method, path, status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as real clients use it
    owner: FaultProxy

    def log_message(self, *args):   # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _throttle(self, nbytes: int) -> None:
        if self.owner.bandwidth and nbytes:
            time.sleep(nbytes / self.owner.bandwidth)

    def _proxy(self):
        p = self.owner
        body = self._read_body()
        if self.path.startswith("/_proxy/"):
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            out = json.dumps(p.control(url.path[len("/_proxy/"):], q)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self._throttle(len(body))
        m = _CRED.search(self.headers.get("Authorization", ""))
        if m:
            p._stats.seen_keys.add(m.group(1))
        if p.latency:
            time.sleep(p.latency)
        fault = p._take_fault(self.command, self.path)
        if fault == "drop":
            p._count(self.command, self.path, 0, len(body), 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault in ERRORS:
            status, code, msg = ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{msg}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
            self._answer(status, [("Content-Type", "application/xml")], xml, len(body))
            return
        status, headers, rbody = self._forward(body)
        if fault == "truncate" and len(rbody) > 1:
            self._answer(status, headers, rbody, len(body), cut=len(rbody) // 2)
            return
        if fault == "stall" and len(rbody) > 1:
            self._answer(status, headers, rbody, len(body), cut=len(rbody) // 2)
            time.sleep(120)
            return
        self._answer(status, headers, rbody, len(body))

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in ("transfer-encoding", "content-length", "expect", "connection"):
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            rbody = resp.read()
            headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                            "server", "date")]
            if self.command == "HEAD":
                headers.append(("Content-Length", resp.getheader("Content-Length", "0")))
            return resp.status, headers, rbody
        finally:
            conn.close()

    def _answer(self, status, headers, body: bytes, nin: int, cut: int | None = None):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        if cut is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        sent = body if cut is None else body[:cut]
        if self.command == "HEAD":
            sent = b""
        for i in range(0, len(sent), 1 << 16):
            piece = sent[i:i + (1 << 16)]
            self._throttle(len(piece))
            self.wfile.write(piece)
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True
        self.owner._count(self.command, self.path, status, nin, len(sent))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class ProxyProcess:
    """FaultProxy in a child process; same methods, stats() fetched over HTTP."""

    def __init__(self, upstream_port: int):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(upstream_port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"fault proxy did not start: {line!r}")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _call(self, verb: str, **q) -> dict:
        q = {k: ("none" if v is None and k == "times" else v) for k, v in q.items()}
        q = {k: v for k, v in q.items() if v is not None}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", f"/_proxy/{verb}?{urlencode(q)}")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def inject(self, fault: str, times: int | None = 1, method: str | None = None, path: str | None = None):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {sorted(FAULTS)}")
        self._call("inject", fault=fault, times=times, method=method, path=path)

    def set(self, latency: float | None = None, bandwidth: float | None = None) -> None:
        self._call("set", latency=latency, bandwidth=bandwidth)

    def clear(self) -> None:
        self._call("clear")

    def stats(self) -> Stats:
        return Stats.from_json(self._call("stats"))

    def reset_stats(self) -> Stats:
        return Stats.from_json(self._call("reset_stats"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _orphan_watch(parent: int) -> None:
    """The child proxy ends with the test process that started it, however that one ended."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


if __name__ == "__main__":
    _proxy = FaultProxy(int(sys.argv[1]))
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    print(_proxy.port, flush=True)
    _proxy.server.serve_forever()
