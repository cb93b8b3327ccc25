"""Scopes: separate namespaces in one store, against cache poisoning.

A run writes only into its own scope (`--scope` / RSNAP_SCOPE) and reads its own scope first,
then the scopes it is given as fallbacks (`--read-scope` / RSNAP_READ_SCOPES), e.g. a pull
request's branch scope falling back to the default branch's. A scope is a store of its own
under `<store>/scopes/<name>/` (packs, snapshots, compile-cache entries, locks): nothing a
scope writes is ever referenced from another, so bucket policies can confine an untrusted
run's credentials to `scopes/<its scope>/` and a poisoned scope is never read by trusted runs.
Without a scope, the store's top level is used, as before scopes existed.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlparse, urlunparse

from ..errors import RsnapError, EXIT_USAGE

_PLAIN = re.compile(r"[A-Za-z0-9._-]")


def encode_scope(name: str) -> str:
    """An injective object-name segment for a scope: branch names like `feature/x` keep their
    identity (`feature=2Fx`), and no two names share a namespace."""
    if not name or len(name) > 200:
        raise RsnapError(f"invalid scope {name!r}: 1 to 200 characters", EXIT_USAGE)
    out = "".join(c if _PLAIN.match(c) else "".join(f"={b:02X}" for b in c.encode()) for c in name)
    return "=2E" + out[1:] if out.startswith(".") else out


def scoped_url(url: str, scope: str | None) -> str:
    """The URL of a scope's namespace inside the store at `url` (url itself for no scope)."""
    if not scope:
        return url
    segment = f"scopes/{encode_scope(scope)}"
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        return os.path.join(os.path.expanduser(path), segment)
    return urlunparse(parsed._replace(path=parsed.path.rstrip("/") + "/" + segment))


def read_scopes(own: str | None, fallbacks: list[str] | None) -> list[str | None]:
    """Scopes a restore reads, in order: its own, then each fallback once."""
    env = os.environ.get("RSNAP_READ_SCOPES", "")
    names = fallbacks if fallbacks else [s.strip() for s in env.split(",") if s.strip()]
    order: list[str | None] = [own or None]
    for name in names:
        name = None if name in ("-", "") else name  # "-": the store's top level
        if name not in order:
            order.append(name)
    return order
