"""`rsnap-rustc`: a RUSTC_WRAPPER that caches single rustc calls in the rsnap store.

Cargo runs it as `rsnap-rustc /path/to/rustc <args...>`.  This module is the hot path:
it parses the arguments, decides whether the call is cacheable and otherwise `exec`s
rustc after counting the reason.  Only cacheable calls import `rsnap.compile_cache.cache`
(hashing, zstd, the store), which holds the entry format and the design notes on the
key, path handling and debuginfo.

Turn it on with `RUSTC_WRAPPER=rsnap-rustc` (or `build.rustc-wrapper` in
.cargo/config.toml) and `CARGO_INCREMENTAL=0` so workspace crates are cacheable too.
Environment: RSNAP_STORE (store URL), RSNAP_CACHE_SIZE (LRU bound, default 10G),
RSNAP_STATE_DIR (local stats and toolchain digests), RSNAP_CACHE=0 (disable),
RSNAP_WRAPPER_LOG=<file> (append one line per call: result, crate, reason).
"""
from __future__ import annotations

import os
import sys

from .rustc_call import Invocation, exec_rustc, log_event, non_cacheable_reason, non_compilation_reason


def passthrough(inv: Invocation, table: str, reason: str) -> None:  # never returns: execs rustc
    from . import stats as wrapper_stats

    counter = "non_compilation" if table == "non_compilation_reasons" else "non_cacheable"
    wrapper_stats.update(None, {"requests": 1, counter: 1}, (table, reason))
    log_event("pass", inv, reason)
    exec_rustc(inv.rustc, inv.args)


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        sys.stderr.write("usage: rsnap-rustc /path/to/rustc [rustc arguments...] (use as RUSTC_WRAPPER)\n")
        return 2
    inv = Invocation(argv[0], argv[1:])
    reason = non_compilation_reason(inv)
    if reason:
        passthrough(inv, "non_compilation_reasons", reason)
    if os.environ.get("RSNAP_CACHE", "1") in ("0", "false", "off", "no"):
        passthrough(inv, "non_cacheable_reasons", "disabled")
    reason = non_cacheable_reason(inv)
    if reason:
        passthrough(inv, "non_cacheable_reasons", reason)
    sys.dont_write_bytecode = False  # see rsnap/cli/entry.py: cached bytecode saves ~30 ms per call
    from . import cache

    return cache.compile_cached(inv)


if __name__ == "__main__":
    sys.exit(main())
