"""A stand-in for the GitHub Actions cache service (v2) in front of Azurite, for the tests and
bench/bench_gha.py.

Azurite (npm `azurite`, installed under tests/node by `npm ci`) is the blob service. CacheServer
speaks the service's twirp API the way GitHub's does, in JSON and in protobuf:
  CreateCacheEntry {key, version}          -> {ok, signed_upload_url}; a key taken -> 409 already_exists
  FinalizeCacheEntryUpload {key, version, size_bytes} -> {ok, entry_id}
  GetCacheEntryDownloadURL {key, restore_keys, version} -> {ok, signed_download_url, matched_key}:
      for the key and then each restore key, an exact match, else the newest entry it prefixes.
Signed URLs are Azure service SAS URLs (account devstoreaccount1) through a blob proxy in this
server, which forwards them to Azurite unchanged and counts, delays or cuts the blob traffic.

Test controls: `counts` (calls per method, blob requests and bytes), `entries()`, `delete()`
(eviction), `corrupt()`, `throttle()` (429 + Retry-After), `hang` (answers nothing), `latency` and
`bandwidth` (a hosted runner's link), `env()` (the variables a runner gives JavaScript actions).

`python tests/gha_server.py` runs one in the foreground and prints its environment.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

NODE_DIR = Path(__file__).resolve().parent / "node"
ACCOUNT = "devstoreaccount1"
# Azurite's published development key (https://learn.microsoft.com/azure/storage/common/storage-use-azurite)
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SAS_VERSION = "2021-08-06"
SERVICE = "github.actions.results.api.v1.CacheService"


def node_missing() -> str | None:
    """Why Azurite and @actions/cache cannot run here, or None."""
    if not shutil.which("node"):
        return "node is not installed (needed for Azurite and @actions/cache)"
    if not (NODE_DIR / "node_modules" / ".bin" / "azurite-blob").exists() and shutil.which("npm"):
        # the README's test command does its own set-up: the lockfile pins what npm ci installs
        subprocess.run(["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
                       capture_output=True)
    if not (NODE_DIR / "node_modules" / ".bin" / "azurite-blob").exists():
        return "tests/node has no node_modules: `npm ci --prefix tests/node` failed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Azure SAS ------------------------------------------------------------------------------
def _sign(text: str) -> str:
    mac = hmac.new(base64.b64decode(ACCOUNT_KEY), text.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def _expiry(hours: int = 6) -> str:
    return (datetime.now(timezone.utc) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def blob_sas(container: str, blob: str, permissions: str) -> str:
    """Query string of a service SAS for one blob (Azure's 2020-12-06+ string-to-sign)."""
    se = _expiry()
    resource = f"/blob/{ACCOUNT}/{container}/{blob}"
    text = "\n".join([permissions, "", se, resource, "", "", "http", SAS_VERSION, "b", "", "",
                      "", "", "", "", ""])
    q = {"sv": SAS_VERSION, "spr": "http", "se": se, "sr": "b", "sp": permissions, "sig": _sign(text)}
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items())


def account_sas() -> str:
    se = _expiry()
    text = "\n".join([ACCOUNT, "rwdlac", "b", "sco", "", se, "", "http", SAS_VERSION, "", ""])
    q = {"sv": SAS_VERSION, "ss": "b", "srt": "sco", "sp": "rwdlac", "se": se, "spr": "http", "sig": _sign(text)}
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items())


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the test process dies, so no Azurite outlives a killed run."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG


# -- Azurite --------------------------------------------------------------------------------
class Azurite:
    """Azurite's blob service on loopback, data in memory; one per test session."""

    def __init__(self, port: int, proc: subprocess.Popen, workdir: str):
        self.port, self.proc, self.workdir = port, proc, workdir

    @classmethod
    def start(cls) -> "Azurite":
        port, workdir = free_port(), tempfile.mkdtemp(prefix="azurite-")
        proc = subprocess.Popen(
            [str(NODE_DIR / "node_modules" / ".bin" / "azurite-blob"), "--blobHost", "127.0.0.1",
             "--blobPort", str(port), "--inMemoryPersistence", "--silent",
             "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return cls(port, proc, workdir)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"Azurite did not start: {proc.stderr.read().decode()[-500:]}")
                time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.title(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def create_container(self, name: str) -> None:
        status, _, body = self.request("PUT", f"/{ACCOUNT}/{name}?restype=container&{account_sas()}",
                                       headers={"x-ms-version": SAS_VERSION})
        if status not in (201, 409):
            raise RuntimeError(f"Azurite: create container {name}: HTTP {status} {body[:200]!r}")

    def stop(self) -> None:
        self.proc.kill()    # data is in memory: nothing to flush
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- protobuf, just the wire format of these messages -----------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_decode(data: bytes) -> dict[int, list]:
    """{field number: [values]}; length-delimited values stay bytes."""
    fields: dict[int, list] = {}
    i = 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while i < len(data):
        tag = varint()
        no, wire = tag >> 3, tag & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value, i = data[i:i + n], i + n
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        fields.setdefault(no, []).append(value)
    return fields


def pb_encode(fields: list[tuple[int, object]]) -> bytes:
    out = bytearray()
    for no, value in fields:
        if isinstance(value, bool) or isinstance(value, int):
            if value:
                out += _varint(no << 3) + _varint(int(value))
        elif value:
            raw = value.encode() if isinstance(value, str) else value
            out += _varint(no << 3 | 2) + _varint(len(raw)) + raw
    return bytes(out)


# Field numbers and JSON names of the three methods (github.actions.results.api.v1, cache.proto).
REQUESTS = {
    "CreateCacheEntry": {2: "key", 3: "version"},
    "FinalizeCacheEntryUpload": {2: "key", 3: "size_bytes", 4: "version"},
    "GetCacheEntryDownloadURL": {2: "key", 3: "restore_keys", 4: "version"},
}
RESPONSES = {
    "CreateCacheEntry": ["ok", "signed_upload_url", "message"],
    "FinalizeCacheEntryUpload": ["ok", "entry_id", "message"],
    "GetCacheEntryDownloadURL": ["ok", "signed_download_url", "matched_key"],
}
_CAMEL = {"size_bytes": "sizeBytes", "restore_keys": "restoreKeys"}


def decode_request(method: str, body: bytes, protobuf: bool) -> dict:
    names = REQUESTS[method]
    if protobuf:
        raw = pb_decode(body)
        msg = {}
        for no, name in names.items():
            vals = raw.get(no, [])
            if name == "restore_keys":
                msg[name] = [v.decode() for v in vals]
            elif name == "size_bytes":
                msg[name] = vals[-1] if vals else 0
            else:
                msg[name] = vals[-1].decode() if vals else ""
        return msg
    data = json.loads(body or b"{}")
    msg = {n: data.get(n, data.get(_CAMEL.get(n, n))) for n in names.values()}
    msg["restore_keys"] = msg.get("restore_keys") or []
    msg["size_bytes"] = int(msg.get("size_bytes") or 0)
    return {k: ("" if v is None else v) for k, v in msg.items()}


def encode_response(method: str, msg: dict, protobuf: bool) -> bytes:
    if protobuf:
        return pb_encode([(i + 1, msg.get(n, "")) for i, n in enumerate(RESPONSES[method])])
    out = {k: v for k, v in msg.items() if v not in ("", None)}
    if "entry_id" in out:
        out["entry_id"] = str(out["entry_id"])    # int64 is a string in proto3 JSON
    return json.dumps(out).encode()


# -- the cache service ----------------------------------------------------------------------
class CacheServer:
    """One cache service (one repository's cache); entries live in one Azurite container."""

    def __init__(self, azurite: Azurite, token: str = "test-runtime-token"):
        self.azurite, self.token = azurite, token
        self.container = "cache-" + os.urandom(6).hex()
        azurite.create_container(self.container)
        self.lock = threading.Lock()
        self._entries: dict[tuple[str, str], dict] = {}   # (key, version) -> entry
        self._seq = 0
        self.counts: Counter = Counter()
        self.hang = False             # twirp calls answer nothing (a hung service)
        self.latency = 0.0            # seconds added to every request (API call or blob request)
        self.bandwidth = 0.0          # bytes/s of blob traffic, shared by all requests; 0 = unlimited
        self._link_free = 0.0
        self._throttle: list = []     # [calls left, retry-after seconds, methods or None]
        self._stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def behind(self, endpoint: str) -> None:
        """Be reached at `endpoint` (a proxy in front, e.g. tests/fault_proxy.py): the URL in
        env() and in the signed URLs, so blob traffic goes through it too."""
        self.url = endpoint.rstrip("/") + "/"

    def env(self) -> dict[str, str]:
        """The variables GitHub's runner gives JavaScript actions (and rsnap's gha store reads)."""
        return {"ACTIONS_CACHE_SERVICE_V2": "True", "ACTIONS_RESULTS_URL": self.url,
                "ACTIONS_RUNTIME_TOKEN": self.token}

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- controls -----------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Finalized entries, oldest first: key, version, size, entry_id, blob."""
        with self.lock:
            return sorted((dict(e) for e in self._entries.values() if e["finalized"]),
                          key=lambda e: e["seq"])

    def keys(self) -> list[str]:
        return [e["key"] for e in self.entries()]

    def delete(self, pred) -> list[str]:
        """Evict the entries whose key `pred(key)` accepts (index and blob); their keys."""
        with self.lock:
            gone = [k for k in self._entries if pred(k[0])]
            entries = [self._entries.pop(k) for k in gone]
        for e in entries:
            self.azurite.request("DELETE", f"/{ACCOUNT}/{self.container}/{e['blob']}?"
                                 f"{blob_sas(self.container, e['blob'], 'd')}",
                                 headers={"x-ms-version": SAS_VERSION})
        return [k for k, _ in gone]

    def corrupt(self, pred) -> list[str]:
        """Flip bytes in the middle of the blobs of the entries whose key `pred(key)` accepts
        (same length: only reading the content can tell); their keys."""
        with self.lock:
            hit = [e for k, e in self._entries.items() if e["finalized"] and pred(k[0])]
        for e in hit:
            path = f"/{ACCOUNT}/{self.container}/{e['blob']}"
            _, _, body = self.azurite.request("GET", f"{path}?{blob_sas(self.container, e['blob'], 'r')}",
                                              headers={"x-ms-version": SAS_VERSION})
            mid = len(body) // 2
            bad = body[:mid] + bytes(b ^ 0xFF for b in body[mid:mid + 64]) + body[mid + 64:]
            self.azurite.request("PUT", f"{path}?{blob_sas(self.container, e['blob'], 'cw')}", bad,
                                 {"x-ms-version": SAS_VERSION, "x-ms-blob-type": "BlockBlob"})
        return [e["key"] for e in hit]

    def throttle(self, calls: int, retry_after: float = 1, methods=None) -> None:
        """The next `calls` twirp calls (of `methods`, default all) answer 429 + Retry-After."""
        with self.lock:
            self._throttle = [calls, retry_after, set(methods) if methods else None]

    def _throttled(self, method: str):
        with self.lock:
            left, after, methods = self._throttle or (0, 0, None)
            if left <= 0 or (methods and method not in methods):
                return None
            self._throttle[0] -= 1
            return after

    def _delay(self, nbytes: int) -> None:
        wait = self.latency
        if self.bandwidth and nbytes:
            with self.lock:
                now = time.monotonic()
                start = max(now, self._link_free)
                self._link_free = start + nbytes / self.bandwidth
                wait += self._link_free - now
        if wait:
            time.sleep(wait)

    # -- the three methods ----------------------------------------------------------------------
    def _blob_url(self, blob: str, permissions: str) -> str:
        return f"{self.url}{ACCOUNT}/{self.container}/{blob}?{blob_sas(self.container, blob, permissions)}"

    def create(self, req: dict) -> tuple[int, dict]:
        key, version = req["key"], req["version"]
        if not key or len(key) > 512 or "," in key or not version:
            return 400, {"code": "invalid_argument", "msg": "key must be 1-512 characters without ',' and version is required"}
        with self.lock:
            if (key, version) in self._entries:
                return 409, {"code": "already_exists", "msg": "cache entry with the same key, version, and scope already exists"}
            self._seq += 1
            blob = f"{self._seq:08d}"
            self._entries[(key, version)] = {"key": key, "version": version, "blob": blob, "size": 0,
                                             "finalized": False, "seq": self._seq, "entry_id": self._seq}
        return 200, {"ok": True, "signed_upload_url": self._blob_url(blob, "cw")}

    def finalize(self, req: dict) -> tuple[int, dict]:
        with self.lock:
            e = self._entries.get((req["key"], req["version"]))
        if e is None or e["finalized"]:
            return 404, {"code": "not_found", "msg": "no cache entry reserved for this key and version"}
        status, headers, _ = self.azurite.request(
            "HEAD", f"/{ACCOUNT}/{self.container}/{e['blob']}?{blob_sas(self.container, e['blob'], 'r')}",
            headers={"x-ms-version": SAS_VERSION})
        if status != 200:
            return 200, {"ok": False, "message": "the entry's blob was not uploaded"}
        with self.lock:
            self._seq += 1
            e.update(finalized=True, size=int(headers.get("Content-Length", 0)), seq=self._seq)
        return 200, {"ok": True, "entry_id": e["entry_id"]}

    def lookup(self, req: dict) -> tuple[int, dict]:
        version = req["version"]
        with self.lock:
            live = [e for e in self._entries.values() if e["finalized"] and e["version"] == version]
        for i, k in enumerate([req["key"], *req["restore_keys"]]):
            exact = [e for e in live if e["key"] == k]
            found = exact or [e for e in live if e["key"].startswith(k)]
            if found:
                e = max(found, key=lambda e: e["seq"])
                return 200, {"ok": True, "signed_download_url": self._blob_url(e["blob"], "r"),
                             "matched_key": e["key"]}
        return 200, {"ok": False}


def _handler(server: CacheServer):
    methods = {"CreateCacheEntry": server.create, "FinalizeCacheEntryUpload": server.finalize,
               "GetCacheEntryDownloadURL": server.lookup}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    n = int(self.rfile.readline().split(b";")[0], 16)
                    if not n:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(n)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_POST(self):
            if self.path.startswith(f"/twirp/{SERVICE}/"):
                return self._twirp(self.path.rsplit("/", 1)[1])
            self._blob()

        def _twirp(self, method: str):
            body = self._body()
            if server.hang:
                server._stopping.wait()
                return
            server.counts[method] += 1
            server._delay(0)
            protobuf = self.headers.get("Content-Type", "").startswith("application/protobuf")
            server.counts["protobuf" if protobuf else "json"] += 1

            def error(status, code, msg, extra=None):
                self._send(status, json.dumps({"code": code, "msg": msg}).encode(),
                           {"Content-Type": "application/json", **(extra or {})})
            if self.headers.get("Authorization") != f"Bearer {server.token}":
                return error(401, "unauthenticated", "invalid runtime token")
            if method not in methods:
                return error(404, "bad_route", f"no method {method}")
            after = server._throttled(method)
            if after is not None:
                server.counts["throttled"] += 1
                return error(429, "resource_exhausted", "too many cache entries created",
                             {"Retry-After": str(after)})
            try:
                req = decode_request(method, body, protobuf)
            except (ValueError, IndexError, UnicodeDecodeError):
                return error(400, "malformed", "cannot decode the request")
            status, msg = methods[method](req)
            if status != 200:
                return error(status, msg["code"], msg["msg"])
            ctype = "application/protobuf" if protobuf else "application/json"
            self._send(200, encode_response(method, msg, protobuf), {"Content-Type": ctype})

        def _blob(self):
            """Forward a blob request to Azurite (the path and SAS are Azurite's own)."""
            body = self._body()
            if server.hang:
                server._stopping.wait()
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "transfer-encoding", "connection", "content-length")}
            status, rheaders, rbody = server.azurite.request(self.command, self.path, body, headers)
            m = re.fullmatch(r"bytes (\d+)-(-?\d+)/(\d+)", rheaders.get("Content-Range", ""))
            if m and int(m[2]) < int(m[1]):
                # Azurite answers a range starting at the end ("bytes 10-9/10", "bytes 0--1/0"
                # for an empty blob) with 206; Azure with 416 InvalidRange
                status, rheaders, rbody = 416, {"Content-Range": f"bytes */{m[3]}"}, b""
            server.counts["blob_" + self.command.lower()] += 1
            server.counts["bytes_up"] += len(body)
            server.counts["bytes_down"] += len(rbody) if self.command == "GET" else 0
            server._delay(len(body) + len(rbody))
            keep = {k: v for k, v in rheaders.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive")}
            if self.command == "HEAD":
                keep["Content-Length"] = rheaders.get("Content-Length", "0")
                self.send_response(status)
                for k, v in keep.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            self._send(status, rbody, keep)

        do_PUT = do_GET = do_HEAD = do_DELETE = _blob

    return Handler


if __name__ == "__main__":
    reason = node_missing()
    if reason:
        sys.exit(reason)
    az = Azurite.start()
    srv = CacheServer(az)
    print(" ".join(f"{k}={v}" for k, v in srv.env().items()), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        az.stop()
