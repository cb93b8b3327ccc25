"""GitHub Actions cache store: `gha://<prefix>`, the runner's cache service (v2) as an object store
through OpenDAL's `ghac` service, one cache entry per object under the key `<prefix>/<name>`.

It needs what GitHub gives JavaScript actions: ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN
(rsnap's restore action passes them on). Entries are immutable and the service has no LIST and no
delete: packs are content-addressed, so a pack someone wrote first is the same pack; manifests
have unique names; the newest snapshot is found by the service's prefix lookup
(rsnap.store.gha_service); GitHub evicts entries (7 days unused, or over the repository's budget).
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

from ..errors import PermanentStoreError, StoreError
from . import gha_service
from .opendal_backend import MULTIPART_FROM, PART_JOBS, OpenDALBackend, check_name, env_float

VERSION = "rsnap-1"              # the entries' version (namespace): other tools' entries never match
CONTENT_NAMED = ("packs/", "cache/")  # an object under these is determined by its name


class GhaStore(OpenDALBackend):
    label = "GitHub Actions cache"
    container = "the GitHub Actions cache"
    denied_hint = "the runtime token was refused (it expires after 6 h; a fork's pull request cannot write)"
    default_retries = 2              # a 429 is waited out for its Retry-After instead (gha_service)
    silence_seconds = 10.0           # a write timed out after its entry was reserved would look "exists" on retry

    def __init__(self, url: str, jobs: int | None = None):
        p = urlparse(url)
        self.prefix = (p.netloc + p.path).strip("/")
        env = os.environ
        if p.scheme != "gha" or not self.prefix:
            raise PermanentStoreError(f"invalid GitHub Actions cache store URL {url!r} (use gha://<prefix>)")
        if not env.get("ACTIONS_RESULTS_URL") or not env.get("ACTIONS_RUNTIME_TOKEN"):
            raise PermanentStoreError("the gha store needs ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN, which "
                                      "GitHub gives actions, not run: steps (use rsnap's restore action)")
        env.setdefault("ACTIONS_CACHE_SERVICE_V2", "true")   # OpenDAL reads it; v2 is github.com's only protocol
        self._results, self._token = env["ACTIONS_RESULTS_URL"], env["ACTIONS_RUNTIME_TOKEN"]
        super().__init__("ghac", {"root": "/" + self.prefix, "version": VERSION, "endpoint": self._results,
                                  "runtime_token": self._token},
                         url=f"gha://{self.prefix}", endpoint=self._results, env="GHA", jobs=jobs)
        self.capabilities = self.capabilities._replace(list=False, delete=False, conditional_create=True)
        self.traffic = dict.fromkeys(("entries_down", "bytes_down", "entries_up", "bytes_up"), 0)

    def wrap_operator(self, op):
        return gha_service.Metered(op, self.traffic)

    def put(self, name: str, data: bytes) -> None:
        if not self.put_if_absent(name, data) and not name.startswith(CONTENT_NAMED):
            raise PermanentStoreError(f"store object {name} exists already in {self.url} (entries are immutable)")

    def put_if_absent(self, name: str, data: bytes) -> bool:
        kw = {"chunk": MULTIPART_FROM, "concurrent": PART_JOBS} if len(data) >= MULTIPART_FROM else {}
        try:
            self._run("write", name, lambda op: op.write(check_name(name), bytes(data), **kw), size=len(data))
            return True
        except StoreError as e:
            if e.opendal_kind == "AlreadyExists":
                return False
            raise

    def _error(self, e: Exception, action: str, name: str = "") -> StoreError:
        text = str(e)
        if "status: 416" in text:       # ghac reports Azure's InvalidRange as Unexpected
            return StoreError(f"store object {name} is truncated")
        if "status: 404" in text and "service_operation: Download" not in text:   # a twirp route
            return PermanentStoreError(f"no GitHub Actions cache service at {self.endpoint} (HTTP 404)")
        return super()._error(e, action, name)

    def newest(self, prefix: str) -> str | None:
        key = gha_service.newest_key(self._results, self._token, f"{self.prefix}/{prefix}",
                                    gha_service.version_digest(VERSION), env_float("RSNAP_GHA_LOOKUP_TIMEOUT", 2.0))
        return key[len(self.prefix) + 1:] if key else None

    def delete(self, name: str) -> None:
        raise PermanentStoreError(f"{self.url} cannot delete entries (GitHub evicts them: 7 days unused or over budget)")

    def stat_all(self, prefix: str = "") -> list[tuple[str, int, float]]:
        raise PermanentStoreError(f"{self.url} cannot list its entries (the cache service has no LIST)")
