"""The GitHub Actions cache service's restore-key lookup, its 429 budget, and traffic counts.

OpenDAL's `ghac` asks the service for exact keys only and cannot LIST, so the gha store finds the
newest snapshot with the service's own prefix match: one twirp call, GetCacheEntryDownloadURL
with `restore_keys`, which answers the most recently created entry whose key starts with the
prefix. JSON over urllib (the stdlib; the service accepts JSON as well as protobuf).

Rate limits (429 + Retry-After, e.g. over ~200 new entries per minute per repository) are waited
out while the process's throttle budget lasts (RSNAP_GHA_THROTTLE_BUDGET seconds, default 60),
so a busy repository slows a job down by at most that much instead of stalling it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time

from ..errors import PermanentStoreError, TransientStoreError

SERVICE_PATH = "twirp/github.actions.results.api.v1.CacheService/"
_budget_lock = threading.Lock()
_budget_left: list[float] = []


def wait_out_throttle(retry_after: float, deadline: float | None = None) -> bool:
    """Sleep for a 429's Retry-After if the process's budget (and `deadline`) allow; False if not."""
    wait = max(0.1, retry_after)
    with _budget_lock:
        if not _budget_left:
            _budget_left.append(_env_float("RSNAP_GHA_THROTTLE_BUDGET", 60))
        if wait > _budget_left[0] or (deadline is not None and time.monotonic() + wait > deadline):
            return False
        _budget_left[0] -= wait
    time.sleep(wait)
    return True


def retry_after_seconds(text: str) -> float:
    """Retry-After (seconds) from a header value or from an OpenDAL error's response context."""
    m = re.search(r'retry-after"?:\s*"?(\d+(?:\.\d+)?)', text, re.I) or re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*", text)
    return float(m.group(1)) if m else 1.0


def newest_key(results_url: str, token: str, prefix: str, version: str, timeout: float) -> str | None:
    """The key of the newest entry under `prefix` (None if there is none), within `timeout` s."""
    import urllib.error
    import urllib.request
    url = results_url.rstrip("/") + "/" + SERVICE_PATH + "GetCacheEntryDownloadURL"
    body = json.dumps({"key": prefix, "restore_keys": [prefix], "version": version}).encode()
    host = re.sub(r"^\w+://([^/]+).*", r"\1", results_url)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=max(0.1, left)) as resp:
                answer = json.loads(resp.read() or b"{}")
            return answer.get("matched_key") or answer.get("matchedKey") if answer.get("ok") else None
        except urllib.error.HTTPError as e:
            if e.code == 429 and wait_out_throttle(retry_after_seconds(e.headers.get("Retry-After", "1")), deadline):
                continue
            if e.code in (401, 403):
                raise PermanentStoreError(f"the GitHub Actions cache service at {host} refused the runtime "
                                          f"token (HTTP {e.code})") from None
            raise TransientStoreError(f"the GitHub Actions cache service at {host} answered HTTP {e.code} "
                                      f"to a lookup of {prefix}") from None
        except ValueError:
            raise TransientStoreError(f"the GitHub Actions cache service at {host} answered no twirp JSON") from None
        except OSError as e:   # URLError, timeouts and resets
            why = getattr(e, "reason", None) or e
            why = "no answer within %gs" % timeout if "timed out" in str(why) else str(why)
            raise TransientStoreError(f"cannot reach the GitHub Actions cache service at {host} ({why})") from None


class Metered:
    """The operator, counting what crosses the network (the job summary's "moved" line), with
    each call that ends in 429 repeated after its Retry-After while the budget lasts."""

    def __init__(self, op, traffic: dict):
        self._op, self._traffic = op, traffic

    def __getattr__(self, attr):
        fn = getattr(self._op, attr)

        def call(*args, **kw):
            while True:
                try:
                    out = fn(*args, **kw)
                    break
                except Exception as e:
                    if type(e).__name__ != "RateLimited" or not wait_out_throttle(
                            retry_after_seconds(str(e))):
                        raise
            if attr in ("read", "write"):
                way = "down" if attr == "read" else "up"
                self._traffic[f"entries_{way}"] += 1
                self._traffic[f"bytes_{way}"] += len(out if attr == "read" else args[1])
            return out
        return call


def version_digest(version: str) -> str:
    """What OpenDAL's ghac sends as the entries' version: the sha256 of the one it is given."""
    import hashlib
    return hashlib.sha256(version.encode()).hexdigest()


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default
