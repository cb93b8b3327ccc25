"""Helpers for the reliability tests: store checker, fault injection, reduced privileges, mounts.

Fault injection uses rsnap/faults.py: RSNAP_FAULT=<point glob>:<n>[:kill|enospc|eio|eacces],
RSNAP_FAULT_TRACE=<file> to list the points a run passes.
"""
from __future__ import annotations

import collections
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import xxhash

from rsnap.repository import repo
from rsnap.store import LocalStore
from rsnap_util import RsnapResult

# Every test in this suite that expects an error checks it was reported as one line.
SOURCE_EXTS = (".rs", ".toml", ".txt", ".lock")
OLD_MTIME_NS = 978_307_200 * 10**9  # 2001-01-01: sources "as of their commit" (git-restore-mtime)


def run_rsnap(ws, store: Path, *args: str, env_extra: dict | None = None, preexec_fn=None,
              timeout: float = 300) -> RsnapResult:
    """Like rsnap_util.rsnap, plus preexec_fn (capability drop, rlimits) and a timeout."""
    env = {**ws.env, "RSNAP_STORE": str(store), **(env_extra or {})}
    env.pop("CI", None)
    proc = subprocess.run([sys.executable, "-m", "rsnap", *args], cwd=ws.root, env=env, capture_output=True,
                          text=True, preexec_fn=preexec_fn, timeout=timeout)
    return RsnapResult(proc.returncode, proc.stdout, proc.stderr)


# Kills that landed in this pytest process, by fault point: conftest prints them at the end.
LANDED_KILLS: collections.Counter = collections.Counter()


def run_killed(ws, store: Path, spec: str, *args: str, env_extra: dict | None = None) -> RsnapResult:
    """Run rsnap with RSNAP_FAULT=`spec` (a kill): it must die by SIGKILL, i.e. at that point,
    since nothing else here sends SIGKILL. An exit 0 means the point was never reached: a failure."""
    res = run_rsnap(ws, store, *args, env_extra={**(env_extra or {}), "RSNAP_FAULT": spec})
    assert res.returncode == -signal.SIGKILL, \
        f"the kill at {spec} did not land: `rsnap {' '.join(args)}` exited {res.returncode}\n{res.stderr[-2000:]}"
    LANDED_KILLS[spec.split(":")[0]] += 1
    return res


def start_rsnap(ws, store: Path, *args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**ws.env, "RSNAP_STORE": str(store), **(env_extra or {})}
    env.pop("CI", None)
    return subprocess.Popen([sys.executable, "-m", "rsnap", *args], cwd=ws.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stderr(proc: subprocess.Popen, text: str) -> str:
    """Read `proc`'s stderr until a line contains `text` (an event, not a time); fail if it exits first."""
    seen = ""
    while line := proc.stderr.readline():
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"exited ({proc.wait()}) without printing {text!r}:\n{seen[-2000:]}")


def trace_points(ws, store: Path, tmp: Path, *args: str) -> tuple[RsnapResult, collections.Counter, list[str]]:
    """Run rsnap with RSNAP_FAULT_TRACE; return the result, point counts and the ordered trace."""
    trace = tmp / f"trace-{time.monotonic_ns()}"
    res = run_rsnap(ws, store, *args, env_extra={"RSNAP_FAULT_TRACE": str(trace)})
    names = trace.read_text().split() if trace.exists() else []
    trace.unlink(missing_ok=True)
    return res, collections.Counter(names), names


# ---------------------------------------------------------------- store checker

def check_store(path: Path) -> dict:
    """Every snapshot in the store is complete: each manifest validates and every blob it lists
    decompresses to the recorded size and digest. Every visible pack is whole (its name is the
    hash of its bytes), so a half-written pack can never be visible."""
    store = LocalStore(Path(path), create=False)
    snaps = repo.list_snapshots(store)
    blobs = 0
    packs: dict[str, bytes] = {}
    for name, _key, _created in snaps:
        m = repo.read_manifest(store, name)
        for digest, loc in m.blobs.items():
            if loc[0] not in packs:
                packs[loc[0]] = store.get(repo.pack_name(loc[0]))
            repo.read_blob(store, loc, digest, packs)
            blobs += 1
    visible_packs = store.list("packs/")
    for name in visible_packs:
        pack_id = name.rsplit("/", 1)[1]
        data = packs.get(pack_id) or store.get(name)
        assert xxhash.xxh3_128_hexdigest(data) == pack_id, f"pack {name} is not whole"
    for name in store.list("snapshots/"):
        assert name.count("/") == 2, f"stray object {name}"
    return {"snapshots": len(snaps), "blobs": blobs, "packs": len(visible_packs)}


def store_files(path: Path) -> dict[str, tuple[int, int]]:
    """relpath -> (size, mtime_ns) of every file in a store dir except the lock file and packs
    (a failed save may leave whole, unreferenced packs: check_store verifies them, prune deletes
    them). Temp files are included: a failed write must remove its own."""
    out = {}
    for dirpath, _dirs, files in os.walk(path):
        for fn in files:
            p = Path(dirpath, fn)
            rel = str(p.relative_to(path))
            if rel == ".lock" or (rel.startswith("packs/") and not fn.startswith(".tmp-")):
                continue
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------- workspace states

def set_source_mtimes(ws, mtime_ns: int | None) -> None:
    """Set every file and dir of the worktree (not target/, .git/) to mtime_ns, or to now."""
    ns = mtime_ns if mtime_ns is not None else time.time_ns()
    for dirpath, dirs, files in os.walk(ws.root):
        dirs[:] = [d for d in dirs if not (Path(dirpath) == ws.root and d in ("target", ".git"))]
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), ns=(ns, ns), follow_symlinks=False)
    os.utime(ws.root, ns=(ns, ns))


def checkout(ws, rev: str) -> None:
    """Worktree at `rev` exactly (target/ kept, untracked files removed)."""
    ws.git("checkout", "-qf", rev)
    ws.git("clean", "-qfd")


def copy_tree(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    if src.exists():
        shutil.copytree(src, dst, symlinks=True)


# ---------------------------------------------------------------- privileges and mounts

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3
_PR_CAPBSET_DROP = 24


def drop_dac_caps() -> None:
    """preexec_fn: this process (and what it execs, root or not) obeys file permission bits.
    Root bypasses mode bits through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH; dropping them from
    the bounding set before exec removes them from the new program's capabilities."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def dac_caps_droppable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "print(1)"], preexec_fn=drop_dac_caps, capture_output=True)
    return probe.returncode == 0


def permissions_enforced(tmp: Path) -> bool:
    """True if a process with dropped DAC capabilities is refused a mode-000 file."""
    if not dac_caps_droppable():
        return False
    f = tmp / "perm-probe"
    f.write_text("x")
    f.chmod(0)
    probe = subprocess.run([sys.executable, "-c", f"open({str(f)!r}).read()"], preexec_fn=drop_dac_caps,
                           capture_output=True)
    f.chmod(0o644)
    return probe.returncode != 0


def file_size_limit(limit: int):
    """preexec_fn: RLIMIT_FSIZE, so writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def try_mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
