"""URL scheme -> backend, and open_store(), which applies the layers (scope, local tier).

To add a backend: one module whose class takes the URL (an OpenDAL service: subclass
rsnap.store.opendal_backend.OpenDALBackend), and one line in SCHEMES naming it. Backend
modules are imported only when their scheme is used, so restore and save against a local
store never load a client library, and this module imports nothing heavy (the compile
cache's wrapper asks it which URLs are remote).
"""
from __future__ import annotations

import os

# scheme -> (module under rsnap.store, class): imported on first use
SCHEMES: dict[str, tuple[str, str]] = {
    "": ("local", "LocalStore"),
    "file": ("local", "LocalStore"),
    "s3": ("s3", "S3Store"),
    "gha": ("gha", "GhaStore"),
}
LOCAL_SCHEMES = ("", "file")


def default_store_url() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rsnap")


def scheme_of(url: str) -> str:
    from urllib.parse import urlparse
    return urlparse(url).scheme


def is_remote(url: str) -> bool:
    """A URL the registry opens as a remote backend (a known scheme other than a path or file://)."""
    scheme = scheme_of(url)
    return scheme in SCHEMES and scheme not in LOCAL_SCHEMES


def backend_class(scheme: str):
    import importlib
    module, cls = SCHEMES[scheme]
    return getattr(importlib.import_module(f"rsnap.store.{module}"), cls)


def open_store(url: str | None = None, create: bool = True, scope: str | None = None):
    """Open the store named by a path or URL (file://, s3://bucket/prefix), in the namespace of
    `scope` (default RSNAP_SCOPE; "" for the top level), see rsnap.store.scope. A remote store
    gets RSNAP_LOCAL_STORE's directory in front when that is set (rsnap.store.tiered)."""
    from ..errors import StoreError
    from .scope import scoped_url
    url = url or os.environ.get("RSNAP_STORE") or default_store_url()
    scope = os.environ.get("RSNAP_SCOPE") if scope is None else scope
    url = scoped_url(url, scope)
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES if s)
        raise StoreError(f"unsupported store URL scheme {scheme!r} in {url!r} (use a path, {known})")
    if scheme in LOCAL_SCHEMES:
        return _open_local(url, create)
    remote = backend_class(scheme)(url)
    local = os.environ.get("RSNAP_LOCAL_STORE")
    if local:  # a persistent runner's local tier in front; each scope's local tier is its own too
        from .tiered import TieredStore
        return TieredStore(_open_local(scoped_url(local, scope), True), remote)
    return remote


def _open_local(url: str, create: bool):
    from urllib.parse import urlparse
    from ..errors import StoreError
    from .local import LocalStore
    parsed = urlparse(url)
    path = parsed.path if parsed.scheme == "file" else url
    if not path:
        raise StoreError(f"invalid store URL {url!r}")
    return LocalStore(os.path.expanduser(path), create=create)
