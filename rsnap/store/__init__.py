"""Store backends: bytes only, nothing of cargo or snapshots (that is rsnap.repository).

base (the Backend interface, Capabilities), registry (URL scheme -> backend, open_store with
its layers), local, opendal_backend (OpenDAL plumbing) and s3, and the layers lock, tiered,
scope, cache_sync. Backend modules load only when their scheme is used; importing this
package imports only the registry.
"""
from __future__ import annotations

from .registry import default_store_url, open_store

__all__ = ["LocalStore", "default_store_url", "open_store"]


def __getattr__(name: str):
    if name == "LocalStore":    # `from rsnap.store import LocalStore`, without loading it for the registry
        from .local import LocalStore
        return LocalStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
