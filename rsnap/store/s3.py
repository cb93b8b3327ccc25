"""S3-compatible store: `s3://bucket/prefix`, through Apache OpenDAL (the `opendal` wheel).

The same flat object space as LocalStore ("packs/…", "snapshots/…", "cache/…"); a PUT is
atomic by nature (readers see the old object, the new one, or none). Configuration is the
standard AWS one: AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (path-
style addressing whenever an endpoint is given), ~/.aws/config and credentials with AWS_PROFILE,
web-identity and instance roles. OpenDAL reads credentials itself; region and endpoint_url
of a profile it does not read, so they are resolved here. URL query parameters override:
`s3://bucket/prefix?region=eu-west-1&endpoint=http://127.0.0.1:9000&profile=ci`.

No flock: `lock()` writes restic-style lock objects under locks/ (docs/design.md, "Remote stores").
Importing this module costs nothing; opening a store imports opendal (~7 ms).
"""
from __future__ import annotations

import os
import random
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from urllib.parse import parse_qs, urlparse

from ..errors import EXIT_LOCKED, RsnapError, StoreError
from .base import check_name as _check_name

MULTIPART_FROM = 16 << 20   # objects at least this long go up in parts of this size
PART_JOBS = 4               # parts in flight per multipart upload


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default




def _profile_settings(profile: str) -> dict:
    """region and endpoint_url of a profile in the shared config file (OpenDAL reads only
    the credentials from it). Parsed only when the environment leaves one of them open."""
    path = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    if not os.path.isfile(path):
        return {}
    import configparser
    cp = configparser.RawConfigParser()
    try:
        cp.read(path)
    except configparser.Error:
        return {}
    section = "default" if profile == "default" else f"profile {profile}"
    return dict(cp.items(section)) if cp.has_section(section) else {}


def resolve(url: str) -> tuple[str, str, dict]:
    """(bucket, prefix, OpenDAL options) for an s3:// URL and the AWS environment."""
    p = urlparse(url)
    bucket, prefix = p.netloc, p.path.strip("/")
    if p.scheme != "s3" or not bucket or "@" in bucket:
        raise StoreError(f"invalid S3 store URL {redact(url)!r} (use s3://bucket/prefix)")
    q = {k: v[-1] for k, v in parse_qs(p.query).items()}
    env = os.environ
    profile = q.get("profile") or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    region = q.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    endpoint = q.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not region or not endpoint:
        prof = _profile_settings(profile)
        region = region or prof.get("region")
        endpoint = endpoint or prof.get("endpoint_url")
    opts = {"bucket": bucket, "root": "/" + prefix, "region": region or "us-east-1"}
    if endpoint:
        opts["endpoint"] = endpoint      # OpenDAL addresses it path-style unless told otherwise
    if q.get("virtual_host") in ("1", "true"):
        opts["enable_virtual_host_style"] = "true"
    if q.get("profile") or env.get("AWS_PROFILE"):
        opts["profile"] = profile
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        opts["disable_ec2_metadata"] = "true"
    return bucket, prefix, opts


def redact(url: str) -> str:
    """A URL without user-info or query secrets, for messages."""
    p = urlparse(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" if p.scheme else url


class S3Store:
    """Objects are S3 objects under s3://bucket/prefix/."""

    remote_store = True   # restore degrades a failed read to a miss; the compile cache uses a local tier

    def __init__(self, url: str, jobs: int | None = None):
        self.bucket, self.prefix, opts = resolve(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = redact(opts.get("endpoint") or f"https://s3.{opts['region']}.amazonaws.com")
        self.jobs = jobs or int(_env_float("RSNAP_S3_JOBS", 8))
        self.retries = int(_env_float("RSNAP_S3_RETRIES", 6))
        self._clock_offset = 0.0    # server clock minus ours, once a lock has measured it
        import opendal
        from opendal.layers import RetryLayer, TimeoutLayer
        try:
            op = opendal.Operator("s3", **opts)
        except Exception as e:
            if not _from_opendal(e):
                raise
            raise StoreError(f"cannot open S3 store {self.url}: {_first_line(e)}") from None
        self._op = (op.layer(TimeoutLayer(timeout=_env_float("RSNAP_S3_TIMEOUT", 60), io_timeout=60))
                    .layer(RetryLayer(max_times=self.retries, factor=2.0, jitter=True,
                                      min_delay=_env_float("RSNAP_S3_RETRY_MIN_DELAY", 0.2),
                                      max_delay=10.0)))

    # -- errors ---------------------------------------------------------------------------
    def _error(self, e: Exception, action: str, name: str = "") -> StoreError:
        """One line naming what failed; never the exception text (it carries request details)."""
        text, kind = str(e), type(e).__name__
        code = _match(r'code: "(\w+)"', text)
        status = _match(r"status: (\d{3})", text)
        what = f"{action} {name}".strip()
        if "too little data" in text:   # a short body that retries did not cure
            msg = f"store object {name} is truncated"
        elif code == "NoSuchBucket":
            msg = f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
        elif kind == "PermissionDenied" or status == "403" or code in (
                "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied"):
            msg = (f"S3 access denied ({code or 'HTTP 403'}) to {self.url} at {self.endpoint}: "
                   f"check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE or role) and the bucket policy")
        elif kind == "RateLimited" or code in ("SlowDown", "Throttling"):
            msg = f"S3 endpoint {self.endpoint} kept throttling ({code or 'HTTP 503'}) through {self.retries} retries: {what}"
        elif kind == "NotFound":
            msg = f"store object {name} is missing from {self.url}"
        elif "send http request" in text or "error sending request" in text:
            why = _match(r"(?:error|Connect)[^\n]*?: ([A-Za-z][^()\n]*?) \(os error", text) or \
                _match(r"(dns error|timed out|Connection reset by peer|Connection refused|connection closed)", text) or "no answer"
            msg = f"cannot reach S3 endpoint {self.endpoint} ({why.strip()}): {what}"
        elif "timeout" in text:
            msg = f"S3 endpoint {self.endpoint} timed out: {what}"
        elif status:
            msg = f"S3 endpoint {self.endpoint} answered HTTP {status} {code or ''} through {self.retries} retries: {what}"
        else:
            msg = f"S3 {what} on {self.url} failed ({kind}{' ' + code if code else ''})"
        return StoreError(msg)

    def _call(self, action: str, name: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:
            if not _from_opendal(e):
                raise
            raise self._error(e, action, name) from None

    # -- the LocalStore interface ---------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        try:
            return self._op.stat(_check_name(name)).content_length
        except Exception as e:
            if not _from_opendal(e):
                raise
            if type(e).__name__ == "NotFound":
                return None
            raise self._error(e, "stat", name) from None

    def get(self, name: str) -> bytes:
        return bytes(self._call("read", name, self._op.read, _check_name(name)))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Ranged GET; a short answer is retried, then reported as truncated."""
        for attempt in range(3):
            try:
                data = self._op.read(_check_name(name), offset=offset, size=length)
            except Exception as e:
                if not _from_opendal(e):
                    raise
                if type(e).__name__ == "RangeNotSatisfied":
                    raise StoreError(f"store object {name} is truncated") from None
                raise self._error(e, "read", name) from None
            if len(data) == length:
                return bytes(data)
            time.sleep(0.1 * (attempt + 1))
        raise StoreError(f"store object {name} is truncated")

    def put(self, name: str, data: bytes) -> None:
        kw = {"chunk": MULTIPART_FROM, "concurrent": PART_JOBS} if len(data) >= MULTIPART_FROM else {}
        self._call("write", name, self._op.write, _check_name(name), bytes(data), **kw)

    def delete(self, name: str) -> None:
        self._call("delete", name, self._op.delete, _check_name(name))

    def touch(self, name: str) -> None:
        """A no-op: S3 cannot change an object's LastModified without rewriting it, and a
        copy onto itself costs a request per use. LRU over S3 objects therefore means "by
        upload time"; the compile cache keeps its LRU in the local tier in front."""

    def list(self, prefix: str = "") -> list[str]:
        return [n for n, _s, _m in self.stat_all(prefix)]

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        """(name, size, mtime) of objects whose name starts with prefix; mtime is the
        server's LastModified. Lock objects are left out unless asked for by prefix."""
        def run():
            out = []
            for e in self._op.list(prefix or "/", recursive=True):
                path = e.path
                if path.endswith("/") or (path.startswith("locks/") and not prefix.startswith("locks/")):
                    continue
                lm = e.metadata.last_modified
                out.append((path, e.metadata.content_length, lm.timestamp() if lm else 0.0))
            return sorted(out)
        return self._call("list", prefix, run)

    # -- parallel helpers -----------------------------------------------------------------
    def get_many(self, names) -> dict[str, bytes]:
        """Whole objects, `jobs` requests in flight; raises the first StoreError."""
        from concurrent.futures import ThreadPoolExecutor
        names = list(names)
        with ThreadPoolExecutor(min(self.jobs, max(1, len(names)))) as pool:
            return dict(zip(names, pool.map(self.get, names)))

    def put_many(self, items) -> None:
        """(name, data) pairs, `jobs` uploads in flight; raises the first StoreError."""
        from concurrent.futures import ThreadPoolExecutor
        items = list(items)
        with ThreadPoolExecutor(min(self.jobs, max(1, len(items)))) as pool:
            for _ in pool.map(lambda kv: self.put(*kv), items):
                pass

    def missing(self, names) -> list[str]:
        """Those of `names` that are not in the store (a save re-checks its packs with this
        just before writing its manifest)."""
        from concurrent.futures import ThreadPoolExecutor
        names = list(names)
        if not names:
            return []
        with ThreadPoolExecutor(min(self.jobs, len(names))) as pool:
            return [n for n, ok in zip(names, pool.map(self.exists, names)) if not ok]

    def now(self) -> float:
        """The server's clock as best known (prune's grace period compares LastModified with it)."""
        return time.time() + self._clock_offset

    @contextmanager
    def lock(self, exclusive: bool):
        """Lock objects, not flock: shared for save, exclusive for prune (docs/design.md, "Remote stores").
        Yields the S3Lock; `check()` raises if it was lost (not refreshed in time)."""
        lk = S3Lock(self, exclusive)
        lk.acquire()
        try:
            yield lk
        finally:
            lk.release()


class S3Lock:
    """locks/<kind>-<host>-<pid>-<rand>: JSON {time, host, pid, exclusive}; refreshed by
    rewriting it every STALE/4 s; one whose LastModified is STALE s behind ours is stale."""

    def __init__(self, store: S3Store, exclusive: bool):
        self.store, self.exclusive = store, exclusive
        self.stale = _env_float("RSNAP_S3_LOCK_STALE", 300)
        self.wait = _env_float("RSNAP_LOCK_WAIT", 600)
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
        kind = "exclusive" if exclusive else "shared"
        self.name = f"locks/{kind}-{host}-{os.getpid()}-{random.getrandbits(32):08x}"
        self._host = host
        self._stop = threading.Event()
        self._refreshed = 0.0   # time.monotonic() of the last successful write
        self._lost = False      # a refresh came too late: others may have called the lock stale
        self._thread = None

    def _write(self, measure: bool = True) -> float:
        """Write (or refresh) the lock object; returns its LastModified, the server's now
        (`measure`=False: acquire reads it from its LIST of locks/ instead, one round trip less)."""
        import json
        body = json.dumps({"time": time.time(), "host": self._host, "pid": os.getpid(),
                           "exclusive": self.exclusive}).encode()
        self.store.put(self.name, body)
        self._refreshed = time.monotonic()
        if not measure:
            return 0.0
        mtime = next((m for n, _s, m in self.store.stat_all(self.name) if n == self.name), None)
        if mtime:
            self.store._clock_offset = mtime - time.time()
        return mtime or time.time()

    def _blockers(self, now: float = 0.0) -> list[tuple[str, float]]:
        """Fresh conflicting locks of others. Without `now`, the server's now is our own lock's
        LastModified in the same LIST."""
        out = []
        locks = self.store.stat_all("locks/")
        if not now:
            own = next((m for n, _s, m in locks if n == self.name), None)
            if own:
                self.store._clock_offset = own - time.time()
            now = own or time.time() + self.store._clock_offset
        for name, _size, mtime in locks:
            if name == self.name:
                continue
            if now - mtime > self.stale:
                continue                # stale: its holder died or was cut off; ignored
            if self.exclusive or name.startswith("locks/exclusive-"):
                out.append((name, now - mtime))
        return out

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        told = False
        while True:
            self._write(measure=False)
            blockers = self._blockers()
            if not blockers:
                break
            self.store.delete(self.name)
            held = ", ".join(f"{n[len('locks/'):]} (refreshed {max(0, a):.0f} s ago)" for n, a in blockers[:3])
            if time.monotonic() > deadline:
                raise RsnapError(f"store {self.store.url} is locked by {held}", EXIT_LOCKED)
            if not told:
                print(f"rsnap: waiting for the lock on store {self.store.url} (held by {held})", file=sys.stderr)
                told = True
            time.sleep(random.uniform(0.5, 1.5) * min(2.0, self.stale / 10))
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True, name="rsnap-s3-lock")
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.stale / 4):
            if time.monotonic() - self._refreshed > self.stale * 0.75:
                self._lost = True   # (a suspended process): refreshing now would hide that
                return
            try:
                self._write()
            except RsnapError:
                pass            # check() notices when refreshes stop succeeding

    def check(self) -> None:
        """Raise unless the lock was refreshed recently enough that no one calls it stale.
        Call before a destructive step (prune's deletes) or a commit (save's manifest)."""
        if self._lost or time.monotonic() - self._refreshed > self.stale * 0.75:
            raise StoreError(f"lost the lock on store {self.store.url}: it could not be refreshed for "
                             f"{time.monotonic() - self._refreshed:.0f} s")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        try:
            self.store.delete(self.name)
        except RsnapError:
            pass                # it goes stale by itself


def _from_opendal(e: Exception) -> bool:
    """OpenDAL's exceptions derive from Exception alone, not from opendal.exceptions.Error."""
    return type(e).__module__.startswith("opendal")


def _match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _first_line(e: Exception) -> str:
    return str(e).split("\n", 1)[0][:200]
