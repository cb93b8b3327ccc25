"""OpenDAL plumbing, written once for any OpenDAL service (the `opendal` wheel).

A backend over OpenDAL subclasses OpenDALBackend and only says how its URL maps to an
operator config (rsnap.store.s3 is the example): `service` (OpenDAL's scheme name), the
options, `label` for messages, `container` (e.g. "S3 bucket 'x'") and `denied_hint`. Here:
the operator with a timeout layer, the fail-fast probe and the retry policy (below), the error
kinds (rsnap.errors) from OpenDAL's exception classes, and get/put/ranged read/list/stat/delete. Importing this module costs
nothing; constructing a backend imports opendal (~7 ms).
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from urllib.parse import urlparse

from .. import faults
from ..errors import NotFoundError, PermanentStoreError, StoreError, TransientStoreError
from .base import Backend, Capabilities, check_name

MULTIPART_FROM = 16 << 20   # objects at least this long go up in parts of this size
PART_JOBS = 4               # parts in flight per multipart upload
MIN_WRITE_RATE = 1 << 20    # bytes/s: a write may take its size at this rate before it counts as stalled


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
    RETRY_MIN_DELAY, PROBE_TIMEOUT, TIMEOUT} (`env` = e.g. "S3"); a backend may change the
    defaults of the last two (`probe_seconds`, `silence_seconds`) and `probe_request`."""

    remote_store = True   # restore degrades a failed read to a miss; the compile cache uses a local tier
    label = "OpenDAL"     # in messages: "<label> access denied …", "cannot reach <label> endpoint …"
    container = "the store"
    denied_hint = "check the credentials"
    missing_container_codes: tuple[str, ...] = ()   # service error codes meaning "no such bucket"
    probe_seconds = 1.0     # the first contact's time to answer (twice at most); RSNAP_<ENV>_PROBE_TIMEOUT
    silence_seconds = 1.5   # after it: no byte for this long is a stall; RSNAP_<ENV>_TIMEOUT
    default_retries = 6     # RSNAP_<ENV>_RETRIES unless set

    def __init__(self, service: str, options: dict, url: str, endpoint: str, env: str,
                 jobs: int | None = None):
        self.url, self.endpoint = url, redact(endpoint)
        self.retries = int(env_float(f"RSNAP_{env}_RETRIES", self.default_retries))
        self.min_delay = env_float(f"RSNAP_{env}_RETRY_MIN_DELAY", 0.2)
        self.silence = env_float(f"RSNAP_{env}_TIMEOUT", self.silence_seconds)
        self.probe_timeout = env_float(f"RSNAP_{env}_PROBE_TIMEOUT", self.probe_seconds)
        import opendal
        try:
            self._raw = opendal.Operator(service, **options)
        except Exception as e:
            if not _from_opendal(e):
                raise
            raise PermanentStoreError(f"cannot open {self.label} store {self.url}: {_first_line(e)}") from None
        self._ops: dict[float, object] = {}
        self._reach_lock = threading.Lock()
        self._reached = False       # the endpoint answered this command's probe
        self._dead: str | None = None   # why every further request of this command fails at once
        cap = self._raw.capability()
        self.capabilities = Capabilities(
            list=bool(cap.list), delete=bool(cap.delete), lock=False,
            conditional_create=bool(cap.write_with_if_not_exists), ranged_reads=True,
            connections=jobs or int(env_float(f"RSNAP_{env}_JOBS", 8)))

    # -- fail fast, then retry ------------------------------------------------------------
    # An endpoint that never answers costs a command ~2 probe timeouts, not minutes: the
    # first request of a command is a probe (`probe_request`, ~1 s to answer, one retry).
    # Once the endpoint has answered, answers that say "try again" (throttling, 5xx, resets,
    # short bodies) get the full retry policy; silence (no byte for `silence` s; a write gets
    # more, by its size) or a refused connection gets one re-probe and one more attempt, and
    # a second one marks the endpoint dead for the rest of the command. The timeout layer sits
    # outside any retrying (OpenDAL's retry layer around a timed-out body read never returned).

    def _op(self, timeout: float):
        op = self._ops.get(timeout)
        if op is None:
            from opendal.layers import TimeoutLayer
            op = self._ops[timeout] = self.wrap_operator(
                self._raw.layer(TimeoutLayer(timeout=timeout, io_timeout=timeout)))
        return op

    def wrap_operator(self, op):
        """A backend may wrap each operator (e.g. to count traffic); here: as it is."""
        return op

    def probe_request(self, op) -> None:
        """One cheap request the endpoint must answer (any answer, even 404 or 403, counts).
        A backend whose service has no stat overrides this."""
        op.stat("rsnap-probe")

    def _reach(self) -> None:
        if self._dead:
            raise TransientStoreError(self._dead)
        if self._reached:
            return
        with self._reach_lock:
            if self._dead:
                raise TransientStoreError(self._dead)
            if not self._reached:
                self._probe()
                self._reached = True

    def _probe(self) -> None:
        """Raise TransientStoreError (and mark the endpoint dead) unless it answers a probe."""
        why = "no answer"
        for attempt in range(2):
            if attempt:
                time.sleep(0.1)
            try:
                self.probe_request(self._op(self.probe_timeout))
                return
            except Exception as e:
                if not _from_opendal(e):
                    raise
                kind = _failure(e)
                if kind not in ("silence", "unreachable"):
                    return      # it answered (an error answer is for the real request to report)
                why = f"no answer within {self.probe_timeout:g} s" if kind == "silence" else _reach_why(str(e))
        self._dead = f"cannot reach {self.label} endpoint {self.endpoint} ({why}, twice)"
        raise TransientStoreError(self._dead)

    def _run(self, action: str, name: str, request, size: int = 0, deadline: float | None = None):
        """`request(op)` under the policy above; OpenDAL errors become StoreErrors. `size`: of
        a write (a PUT's body goes in one io step, which a read's chunks do not).
        `deadline` (time.monotonic()): no attempt starts after it, none runs past it."""
        self._reach()
        silences, last = 0, None
        for attempt in range(self.retries + 1):
            timeout = max(self.silence, size / MIN_WRITE_RATE)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransientStoreError(f"{self.label} {action} {name} did not finish in time")
                timeout = min(timeout, left)
            try:
                return request(self._op(round(timeout, 2)))
            except Exception as e:
                if not _from_opendal(e):
                    raise
                kind, last = _failure(e), e
                if kind in ("silence", "unreachable"):
                    silences += 1
                    if silences > 1:
                        self._dead = f"{self.label} endpoint {self.endpoint} stopped answering ({action} {name})"
                        raise TransientStoreError(self._dead) from None
                    with self._reach_lock:
                        if self._dead:
                            raise TransientStoreError(self._dead) from None
                        self._probe()
                elif kind == "retry" and attempt < self.retries:
                    time.sleep(min(10.0, self.min_delay * 2 ** attempt) * random.uniform(0.5, 1.5))
                else:
                    raise self._error(e, action, name) from None
        raise self._error(last, action, name)

    # -- errors ---------------------------------------------------------------------------
    def _error(self, e: Exception, action: str, name: str = "") -> StoreError:
        err = self._error_of(e, action, name)
        err.opendal_kind = type(e).__name__     # e.g. put_if_absent's "ConditionNotMatch"
        return err

    def _error_of(self, e: Exception, action: str, name: str) -> StoreError:
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

    # -- the Backend interface ------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        try:
            return self._run("stat", name, lambda op: op.stat(check_name(name)).content_length)
        except NotFoundError:
            return None

    def get(self, name: str) -> bytes:
        return bytes(self._run("read", name, lambda op: op.read(check_name(name))))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Ranged GET; a short answer is retried, then reported as truncated."""
        check_name(name)
        for attempt in range(3):
            try:
                data = self._run("read", name, lambda op: op.read(name, offset=offset, size=length))
            except StoreError as e:
                if e.opendal_kind == "RangeNotSatisfied":
                    raise StoreError(f"store object {name} is truncated") from None
                raise
            if len(data) == length:
                return bytes(data)
            time.sleep(0.1 * (attempt + 1))
        raise StoreError(f"store object {name} is truncated")

    def put(self, name: str, data: bytes) -> None:
        self.put_within(name, data, None)

    def put_within(self, name: str, data: bytes, seconds: float | None) -> None:
        kw = {"chunk": MULTIPART_FROM, "concurrent": PART_JOBS} if len(data) >= MULTIPART_FROM else {}
        deadline = None if seconds is None else time.monotonic() + seconds
        faults.point(f"remote.put.{name.split('/')[0]}")   # before the request: nothing sent
        self._run("write", name, lambda op: op.write(check_name(name), bytes(data), **kw), size=len(data),
                  deadline=deadline)
        faults.point(f"remote.{name.split('/')[0]}")       # the object is visible

    def put_if_absent(self, name: str, data: bytes) -> bool:
        if not self.capabilities.conditional_create:
            return super().put_if_absent(name, data)
        try:
            self._run("write", name, lambda op: op.write(check_name(name), bytes(data), if_not_exists=True),
                      size=len(data))
            return True
        except StoreError as e:
            if e.opendal_kind in ("ConditionNotMatch", "AlreadyExists"):
                return False
            raise

    def delete(self, name: str) -> None:
        self._run("delete", name, lambda op: op.delete(check_name(name)))
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
        def run(op):
            out = []
            for e in op.list(prefix or "/", recursive=True):
                path = e.path
                if path.endswith("/") or (path.startswith("locks/") and not prefix.startswith("locks/")):
                    continue
                lm = e.metadata.last_modified
                out.append((path, e.metadata.content_length, lm.timestamp() if lm else 0.0))
            return sorted(out)
        return self._run("list", prefix, run)


def _failure(e: Exception) -> str:
    """What an OpenDAL error says about the endpoint: "silence" (our timeout: no answer),
    "unreachable" (no connection), "retry" (it answered "try again": throttling, 5xx, a reset,
    a short body) or "final" (an answer retrying will not change)."""
    text = str(e)
    if "timeout reached" in text:
        return "silence"
    if ("send http request" in text or "error sending request" in text) and \
            re.search(r"Connection refused|dns error|[Cc]onnect(ion)? timed out|No route to host|[Nn]etwork is unreachable", text):
        return "unreachable"
    if "(temporary)" in text:       # OpenDAL's own judgement of the error
        return "retry"
    return "final"


def _reach_why(text: str) -> str:
    return _match(r"(Connection refused|dns error|timed out|No route to host|[Nn]etwork is unreachable)", text) \
        or "no connection"


def _from_opendal(e: Exception) -> bool:
    """OpenDAL's exceptions derive from Exception alone, not from opendal.exceptions.Error."""
    return type(e).__module__.startswith("opendal")


def _match(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _first_line(e: Exception) -> str:
    return str(e).split("\n", 1)[0][:200]
