"""OpenDAL plumbing, written once for any OpenDAL service (the `opendal` wheel).

A backend over OpenDAL subclasses OpenDALBackend and only says how its URL maps to an
operator config (rsnap.store.s3 is the example): `service` (OpenDAL's scheme name), the
options, `label` for messages, `container` (e.g. "S3 bucket 'x'") and `denied_hint`. Here:
the operator with timeout and retry layers, the error kinds (rsnap.errors) from OpenDAL's
exception classes, and get/put/ranged read/list/stat/delete. Importing this module costs
nothing; constructing a backend imports opendal (~7 ms).
"""
from __future__ import annotations

import os
import re
import time
from urllib.parse import urlparse

from .. import faults
from ..errors import NotFoundError, PermanentStoreError, StoreError, TransientStoreError
from .base import Backend, Capabilities, check_name

MULTIPART_FROM = 16 << 20   # objects at least this long go up in parts of this size
PART_JOBS = 4               # parts in flight per multipart upload


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def redact(url: str) -> str:
    """A URL without user-info or query secrets, for messages."""
    p = urlparse(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" if p.scheme else url


class OpenDALBackend(Backend):
    """Objects under the operator's root. Tunables come from RSNAP_<ENV>_{JOBS, RETRIES,
    TIMEOUT, RETRY_MIN_DELAY} (`env` = e.g. "S3")."""

    remote_store = True   # restore degrades a failed read to a miss; the compile cache uses a local tier
    label = "OpenDAL"     # in messages: "<label> access denied …", "cannot reach <label> endpoint …"
    container = "the store"
    denied_hint = "check the credentials"
    missing_container_codes: tuple[str, ...] = ()   # service error codes meaning "no such bucket"
    default_retries = 6   # RSNAP_<ENV>_RETRIES unless set

    def __init__(self, service: str, options: dict, url: str, endpoint: str, env: str,
                 jobs: int | None = None):
        self.url, self.endpoint = url, redact(endpoint)
        self.retries = int(env_float(f"RSNAP_{env}_RETRIES", self.default_retries))
        import opendal
        from opendal.layers import RetryLayer, TimeoutLayer
        try:
            op = opendal.Operator(service, **options)
        except Exception as e:
            if not _from_opendal(e):
                raise
            raise PermanentStoreError(f"cannot open {self.label} store {self.url}: {_first_line(e)}") from None
        self._op = (op.layer(TimeoutLayer(timeout=env_float(f"RSNAP_{env}_TIMEOUT", 60), io_timeout=60))
                    .layer(RetryLayer(max_times=self.retries, factor=2.0, jitter=True,
                                      min_delay=env_float(f"RSNAP_{env}_RETRY_MIN_DELAY", 0.2), max_delay=10.0)))
        cap = op.capability()
        self.capabilities = Capabilities(
            list=bool(cap.list), delete=bool(cap.delete), lock=False,
            conditional_create=bool(cap.write_with_if_not_exists), ranged_reads=True,
            connections=jobs or int(env_float(f"RSNAP_{env}_JOBS", 8)))

    # -- errors ---------------------------------------------------------------------------
    def _error(self, e: Exception, action: str, name: str = "") -> StoreError:
        """One line naming what failed, typed by OpenDAL's exception class; never the
        exception text (it carries request details). The service's error code and HTTP
        status are read from the text only to word the message."""
        import opendal.exceptions as x
        text = str(e)
        code = _match(r'code: "(\w+)"', text)
        status = _match(r"status: (\d{3})", text)
        what = f"{action} {name}".strip()
        if code in self.missing_container_codes:     # OpenDAL calls it NotFound, like an object
            return PermanentStoreError(f"{self.container} does not exist at {self.endpoint}")
        if isinstance(e, x.NotFound):
            return NotFoundError(f"store object {name} is missing from {self.url}")
        if isinstance(e, x.PermissionDenied) or status == "403":
            return PermanentStoreError(f"{self.label} access denied ({code or 'HTTP 403'}) to {self.url} at "
                                       f"{self.endpoint}: {self.denied_hint}")
        if isinstance(e, x.RateLimited):
            return TransientStoreError(f"{self.label} endpoint {self.endpoint} kept throttling ({code or 'HTTP 503'}) "
                                       f"through {self.retries} retries: {what}")
        if isinstance(e, (x.ConfigInvalid, x.Unsupported, x.IsADirectory, x.NotADirectory)):
            return PermanentStoreError(f"{self.label} {what} on {self.url} failed ({type(e).__name__})")
        # Unexpected: OpenDAL has no class for these; the message tells them apart
        if "too little data" in text:   # a short body that retries did not cure
            return StoreError(f"store object {name} is truncated")
        if "send http request" in text or "error sending request" in text:
            why = _match(r"(?:error|Connect)[^\n]*?: ([A-Za-z][^()\n]*?) \(os error", text) or \
                _match(r"(dns error|timed out|Connection reset by peer|Connection refused|connection closed)", text) \
                or "no answer"
            return TransientStoreError(f"cannot reach {self.label} endpoint {self.endpoint} ({why.strip()}): {what}")
        if "timeout" in text:
            return TransientStoreError(f"{self.label} endpoint {self.endpoint} timed out: {what}")
        if status:
            return TransientStoreError(f"{self.label} endpoint {self.endpoint} answered HTTP {status} {code or ''} "
                                       f"through {self.retries} retries: {what}")
        return StoreError(f"{self.label} {what} on {self.url} failed ({type(e).__name__}{' ' + code if code else ''})")

    def _call(self, action: str, name: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:
            if not _from_opendal(e):
                raise
            raise self._error(e, action, name) from None

    # -- the Backend interface ------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        try:
            return self._op.stat(check_name(name)).content_length
        except Exception as e:
            if not _from_opendal(e):
                raise
            if type(e).__name__ == "NotFound":
                return None
            raise self._error(e, "stat", name) from None

    def get(self, name: str) -> bytes:
        return bytes(self._call("read", name, self._op.read, check_name(name)))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Ranged GET; a short answer is retried, then reported as truncated."""
        for attempt in range(3):
            try:
                data = self._op.read(check_name(name), offset=offset, size=length)
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
        faults.point(f"remote.put.{name.split('/')[0]}")   # before the request: nothing sent
        self._call("write", name, self._op.write, check_name(name), bytes(data), **kw)
        faults.point(f"remote.{name.split('/')[0]}")       # the object is visible

    def put_if_absent(self, name: str, data: bytes) -> bool:
        if not self.capabilities.conditional_create:
            return super().put_if_absent(name, data)
        try:
            self._op.write(check_name(name), bytes(data), if_not_exists=True)
            return True
        except Exception as e:
            if not _from_opendal(e):
                raise
            if type(e).__name__ in ("ConditionNotMatch", "AlreadyExists"):
                return False
            raise self._error(e, "write", name) from None

    def delete(self, name: str) -> None:
        self._call("delete", name, self._op.delete, check_name(name))
        faults.point(f"remote.delete.{name.split('/')[0]}")

    def touch(self, name: str) -> None:
        """A no-op: an object store cannot change an object's mtime without rewriting it, and
        a copy onto itself costs a request per use. LRU over its objects therefore means "by
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


def _from_opendal(e: Exception) -> bool:
    """OpenDAL's exceptions derive from Exception alone, not from opendal.exceptions.Error."""
    return type(e).__module__.startswith("opendal")


def _match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _first_line(e: Exception) -> str:
    return str(e).split("\n", 1)[0][:200]
