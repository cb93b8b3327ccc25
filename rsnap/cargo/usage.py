"""Which build units were used since `rsnap restore`: the input to garbage collection.

Two independent signals, both recorded under `<target>/.rsnap/` (never snapshotted):

1. **Fingerprint atime, armed.** Cargo reads every unit's fingerprint hash file
   (`.fingerprint/<pkg>-<hash>/lib-foo`, v2: `build/<pkg>/<hash>/fingerprint/lib-foo`)
   and its `dep-*` file while deciding freshness, for every unit of the build graph,
   before compiling anything (so also when the build then fails). Units that are not
   in the graph are never read. Under `relatime` (the Linux default) a read only
   updates atime when atime <= mtime (or ctime, or the atime is a day old). A file
   read since it was written has atime > mtime, so an un-armed target would *not*
   record further reads. `arm()` therefore sets atime := mtime on every fingerprint
   file (restore writes its fingerprint files that way already) and records the time
   (`usage.json`); from then on, any read by cargo moves atime to "now" and any
   rebuild moves mtime to "now". `arm()` first probes the filesystem
   (a probe file with atime == mtime is read back): on `noatime` mounts, some
   overlay/FUSE/network filesystems, the probe fails and the atime signal is off.
   Measured here (ext4, relatime): a no-op `cargo build` after arming moved the
   atime of every unit's hash and dep-info files; units of another feature set /
   profile / dependency version kept atime == mtime.
   rsnap itself reads hash files with O_NOATIME, so `rsnap gc --dry-run` does not
   disturb the signal; `rsnap save` reads changed files normally, so it arms again
   (before releasing cargo's locks, keeping its stat cache valid: see `retimed`).

2. **`rsnap cargo <args>`**, an exact log. `usage_log.run_cargo()` runs cargo with
   `--message-format=json-render-diagnostics` (human diagnostics still go to
   stderr; non-JSON stdout such as test or `cargo run` output is forwarded), maps
   every `compiler-artifact` (fresh or not) and `build-script-executed` message to
   its unit (profile dir + 16-hex hash; uplifted files such as `target/debug/app`
   are resolved through their hard link in `deps/` / `build/<pkg>/<hash>/out/`),
   and appends one line per invocation to `used.jsonl`. The log is trusted only
   when every logged invocation since the epoch succeeded and no unit was compiled
   since the epoch that the log does not know (i.e. plain `cargo` was used too).

The epoch is the later of the last `arm()` and the last restore (`restored.json`).
A unit is "used" when its fingerprint files were written or (armed atime) read
since the epoch, or the log names it. When neither signal is reliable, GC keeps
every unit and only the size cap evicts (oldest build first).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .layout import RSNAP_DIR
from .target_layout import profile_dirs, unit_dirs

USAGE_FILE = "usage.json"
USED_LOG = "used.jsonl"
RESTORED_INFO = "restored.json"   # written by snapshot.restore
PROBE_NAME = "atime-probe"
SLACK_NS = 50_000_000             # coarse kernel clock (a few jiffies) vs time.time_ns()


# ---------------------------------------------------------------- roots

def roots(ws) -> list[Path]:
    """Target dir, plus the build dir when it lives elsewhere."""
    out = [Path(ws.target_dir)]
    bd = Path(ws.build_dir)
    if bd != out[0] and not bd.is_relative_to(out[0]):
        out.append(bd)
    return out


def state_dir(ws) -> Path:
    return Path(ws.target_dir) / RSNAP_DIR


# ---------------------------------------------------------------- atime probe

def _mount_options(path: Path) -> str:
    """Mount options of the filesystem holding `path` (informational)."""
    try:
        path = path.resolve()
        best, opts = "", ""
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mnt = parts[4].replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, opts = mnt, parts[5]
        return opts
    except (OSError, IndexError):
        return ""


def probe_atime(directory: Path) -> dict:
    """Does a read of a file whose atime == mtime (an armed file) update its atime here?

    `RSNAP_ATIME=off` turns the atime signal off (the probe then reports False).
    """
    d = Path(directory) / RSNAP_DIR
    result = {"updates": False, "mount_options": _mount_options(Path(directory)), "detail": ""}
    if os.environ.get("RSNAP_ATIME", "").lower() in ("off", "0", "no", "false"):
        result["detail"] = "disabled by RSNAP_ATIME"
        return result
    try:
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{PROBE_NAME}-{os.getpid()}"
        p.write_bytes(b"rsnap atime probe\n")
        old = time.time_ns() - 3_600_000_000_000  # an hour ago: armed files are old
        os.utime(p, ns=(old, old))
        with open(p, "rb") as f:
            f.read()
        after = os.stat(p).st_atime_ns
        p.unlink()
        result["updates"] = after > old
        result["detail"] = "read updated atime" if after > old else "read did not update atime (noatime?)"
    except OSError as e:
        result["detail"] = f"probe failed: {e.strerror}"
    return result


# ---------------------------------------------------------------- fingerprint files

def fingerprint_dirs(root: Path):
    """Every unit fingerprint dir under a target/build root, both layouts."""
    for profile in profile_dirs(root):
        for _layout, _pkg, _hash, fp, _unit_dir in unit_dirs(profile):
            yield fp


def scandir(path: Path):
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def arm(ws, now_ns: int | None = None, retimed: list | None = None) -> dict:
    """Start a usage epoch: atime := mtime on all fingerprint files, record the time.

    Call at the end of `rsnap restore` (hit or miss) and at the end of `rsnap save`.
    Cheap: one utime per fingerprint file (a few per unit) whose atime differs (restore
    writes them armed). Changing atime touches ctime, which the stat cache keys on: pass
    `retimed` to get (path, stat before, stat after) of every file re-timed, so a caller
    holding cargo's locks can keep the stat cache valid (snapshot.save does).
    """
    started = time.monotonic()
    armed_ns = now_ns if now_ns is not None else time.time_ns()
    info = {"armed_ns": armed_ns, "roots": {}}
    files = 0
    for root in roots(ws):
        if not root.is_dir():
            info["roots"][str(root)] = {"atime": False, "detail": "missing"}
            continue
        probe = probe_atime(root)
        entry = {"atime": probe["updates"], "detail": probe["detail"], "mount_options": probe["mount_options"]}
        if probe["updates"]:
            for fp in fingerprint_dirs(root):
                for de in scandir(fp):
                    try:
                        st = de.stat(follow_symlinks=False)
                        if st.st_atime_ns != st.st_mtime_ns:
                            os.utime(de.path, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
                            if retimed is not None:
                                retimed.append((de.path, st, os.lstat(de.path)))
                        files += 1
                    except OSError:
                        continue
        info["roots"][str(root)] = entry
    info["files"] = files
    sd = state_dir(ws)
    sd.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(sd / USAGE_FILE, info)
    info["seconds"] = round(time.monotonic() - started, 3)
    return info


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- reading the signals

class Signals:
    def __init__(self):
        self.epoch_ns: int | None = None
        self.restored_ns: int | None = None
        self.armed_ns: int | None = None
        self.atime = False                  # armed atime is valid for every root
        self.atime_detail: dict = {}
        self.log_units: set = set()         # (profile abs, hash)
        self.log_unresolved: list = []
        self.log_invocations = 0
        self.log_failed = 0
        self.log = False                    # the log is present and complete (decided by gc)
        self.no_build_since_epoch = False   # signals work, but nothing was built or used (decided by gc)

    def describe(self) -> dict:
        return {"epoch_ns": self.epoch_ns, "restored_ns": self.restored_ns, "armed_ns": self.armed_ns,
                "atime": self.atime, "atime_detail": self.atime_detail,
                "cargo_log": {"invocations": self.log_invocations, "failed": self.log_failed,
                              "units": len(self.log_units), "unresolved": len(self.log_unresolved),
                              "trusted": self.log},
                "no_build_since_epoch": self.no_build_since_epoch}


def load_signals(ws) -> Signals:
    sig = Signals()
    restored = [(_read_json(r / RSNAP_DIR / RESTORED_INFO) or {}).get("restored_ns") for r in roots(ws)]
    restored = [r for r in restored if isinstance(r, int)]
    sig.restored_ns = max(restored) if restored else None
    armed = _read_json(state_dir(ws) / USAGE_FILE) or {}
    sig.armed_ns = armed.get("armed_ns") if isinstance(armed.get("armed_ns"), int) else None
    cands = [t for t in (sig.restored_ns, sig.armed_ns) if t is not None]
    sig.epoch_ns = max(cands) if cands else None
    # atime: armed after the last restore, every root probed OK then and now
    if sig.armed_ns is not None and (sig.restored_ns is None or sig.armed_ns >= sig.restored_ns):
        ok = True
        for r in roots(ws):
            at_arm = (armed.get("roots") or {}).get(str(r), {})
            now = probe_atime(r) if r.is_dir() else {"updates": False, "detail": "missing"}
            sig.atime_detail[str(r)] = {"at_arm": at_arm.get("detail"), "now": now["detail"],
                                        "mount_options": now.get("mount_options", "")}
            ok = ok and bool(at_arm.get("atime")) and now["updates"]
        sig.atime = ok
    else:
        sig.atime_detail = {"not_armed": "no arm() since the last restore"}
    # the cargo log
    if sig.epoch_ns is not None:
        try:
            lines = (state_dir(ws) / USED_LOG).read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("started_ns", 0) < sig.epoch_ns:
                continue
            sig.log_invocations += 1
            sig.log_failed += not rec.get("success")
            sig.log_units.update(tuple(u) for u in rec.get("units", []))
            sig.log_unresolved.extend(rec.get("unresolved", []))
    return sig


def prune_log(ws, keep_after_ns: int | None) -> None:
    """Drop log lines older than the epoch (they can never count again)."""
    path = state_dir(ws) / USED_LOG
    if keep_after_ns is None or not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("started_ns", 0) >= keep_after_ns:
                kept.append(line)
        except ValueError:
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, path)
