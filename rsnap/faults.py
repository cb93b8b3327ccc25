"""Deterministic fault injection for the reliability tests. Free when RSNAP_FAULT is unset.

    RSNAP_FAULT=<pattern>:<n>[:<action>]

`pattern` is an fnmatch glob over fault point names ("restore.write", "store.packs.tmp",
"remote.put.snapshots", "prune.packs", "cache.entry", ...: tests/test_fault_points.py
finds them all in the sources and kills each one); the n-th hit (1-based, counted over all matching points in this
process) triggers `action`: `kill` (default: SIGKILL, like kill -9 or a runner dying),
`stop` (SIGSTOP: the test decides when it goes on), `enospc`, `eio`, `eacces` (raise that
OSError at the point). RSNAP_FAULT_TRACE=<file>
appends the name of every point hit, so a test can count them and choose n.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal
import threading

_SPEC = os.environ.get("RSNAP_FAULT")
_TRACE = os.environ.get("RSNAP_FAULT_TRACE")
_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "eacces": errno.EACCES}
_lock = threading.Lock()
_hits = 0


def point(name: str) -> None:
    """A place where a test may crash or fail this process."""
    if _SPEC or _TRACE:
        _hit(name)


def _hit(name: str) -> None:
    global _hits
    with _lock:
        if _TRACE:
            with open(_TRACE, "a") as f:
                f.write(name + "\n")
        if not _SPEC:
            return
        pattern, n, *action = _SPEC.split(":")
        if not fnmatch.fnmatchcase(name, pattern):
            return
        _hits += 1
        if _hits != int(n):
            return
        action = action[0] if action else "kill"
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        code = _ERRORS[action]
        raise OSError(code, f"{os.strerror(code)} (injected at {name})", name)
