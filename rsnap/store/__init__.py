"""Store backends and the URL that picks one; the snapshot repository lives in rsnap.repository.repo.

A backend module per URL scheme: `local` (a path or file://). A remote backend plugs in
here by its scheme, imported only when its URL is used (e.g. `s3://` -> rsnap.store.s3),
so restore and save against a local store never pay for its client library. With
RSNAP_LOCAL_STORE set, a remote store gets a local directory in front (rsnap.store.tiered).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import StoreError
from .local import LocalStore

__all__ = ["LocalStore", "default_store_url", "open_store"]


def default_store_url() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rsnap")


def open_store(url: str | None = None, create: bool = True, scope: str | None = None):
    """Open the store named by a path or URL (file://, s3://bucket/prefix), in the namespace of
    `scope` (default RSNAP_SCOPE; "" for the top level), see rsnap.store.scope."""
    url = url or os.environ.get("RSNAP_STORE") or default_store_url()
    scope = os.environ.get("RSNAP_SCOPE") if scope is None else scope
    if scope:
        from .scope import scoped_url
        url = scoped_url(url, scope)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if not path:
            raise StoreError(f"invalid store URL {url!r}")
        return LocalStore(Path(os.path.expanduser(path)), create=create)
    if parsed.scheme == "s3":
        from .s3 import S3Store  # only s3:// users load the client library
        remote = S3Store(url)
        local = os.environ.get("RSNAP_LOCAL_STORE")
        if local:  # a persistent runner's local tier in front (rsnap.store.tiered)
            from .tiered import TieredStore
            if scope:  # each scope's local tier is its own too
                local = scoped_url(local, scope)
            return TieredStore(LocalStore(Path(os.path.expanduser(local))), remote)
        return remote
    raise StoreError(f"unsupported store URL scheme {parsed.scheme!r} in {url!r} (use a path, file:// or s3://)")
