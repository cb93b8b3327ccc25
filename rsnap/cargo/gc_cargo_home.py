"""GC of $CARGO_HOME: `.crate` files, registry sources, git dbs and checkouts that no
Cargo.lock of the workspace references (see rsnap.cargo.gc, model point 6)."""
from __future__ import annotations

import tomllib
from pathlib import Path

from ..errors import RsnapError
from .gc_fs import LOCK_TIMEOUT_S, Deleter, Report, exclusive_flock, file_bytes, scandir, tree_bytes
from .hashes import cargo_short_hash_str

def _lock_packages(lock_path: Path) -> tuple[set[str], list[tuple[str, str, str]]] | None:
    """(registry '<name>-<version>' set, git [(ident, last segment, rev)]) from Cargo.lock."""
    try:
        data = tomllib.loads(lock_path.read_text())
    except (OSError, ValueError):
        return None
    crates, gits = set(), []
    for pkg in data.get("package", []):
        src = pkg.get("source") or ""
        if src.startswith(("registry+", "sparse+")):
            crates.add(f"{pkg['name']}-{pkg['version']}")
        elif src.startswith("git+"):
            url, _, rev = src[4:].partition("#")
            url = url.split("?")[0]
            canon = canonical_git_url(url)
            seg = canon.rstrip("/").rsplit("/", 1)[-1] or "_empty"
            gits.append((f"{seg}-{cargo_short_hash_str(canon)}", seg, rev))
    return crates, gits


def canonical_git_url(url: str) -> str:
    """cargo's CanonicalUrl: no trailing slash, github.com lowercased over https, no `.git`."""
    u = url.rstrip("/")
    low = u.lower()
    for scheme in ("http://github.com/", "https://github.com/", "git://github.com/"):
        if low.startswith(scheme):
            u = "https://github.com/" + low[len(scheme):]
            break
    if u.endswith(".git"):
        u = u[:-4]
    return u


def _global_cache_recent(home: Path, since_s: int | None) -> dict[str, set[str]]:
    """Names .global-cache says were used since `since_s` (unix seconds)."""
    out = {"registry_crate": set(), "registry_src": set(), "git_db": set(), "git_checkout": set()}
    db = home / ".global-cache"
    if since_s is None or not db.exists():
        return out
    import sqlite3  # ~15 ms to import; only CARGO_HOMEs with cargo's usage database need it
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            for table in out:
                for (name,) in con.execute(f"SELECT name FROM {table} WHERE timestamp >= ?", (since_s,)):
                    out[table].add(name)
        finally:
            con.close()
    except sqlite3.Error:
        pass
    return out


def _forget_in_global_cache(home: Path, removed: dict[str, list[tuple[str, str]]]) -> str:
    """Delete the rows of what GC removed, as cargo's own GC does."""
    db = home / ".global-cache"
    if not db.exists() or not any(removed.values()):
        return "unchanged"
    import sqlite3
    try:
        con = sqlite3.connect(str(db), timeout=10)
        try:
            with con:
                for parent, name in removed["registry_crate"]:
                    con.execute("DELETE FROM registry_crate WHERE name = ? AND registry_id IN "
                                "(SELECT id FROM registry_index WHERE name = ?)", (name, parent))
                for parent, name in removed["registry_src"]:
                    con.execute("DELETE FROM registry_src WHERE name = ? AND registry_id IN "
                                "(SELECT id FROM registry_index WHERE name = ?)", (name, parent))
                for parent, name in removed["git_checkout"]:
                    con.execute("DELETE FROM git_checkout WHERE name = ? AND git_id IN "
                                "(SELECT id FROM git_db WHERE name = ?)", (name, parent))
                for _parent, name in removed["git_db"]:
                    con.execute("DELETE FROM git_checkout WHERE git_id IN (SELECT id FROM git_db WHERE name = ?)", (name,))
                    con.execute("DELETE FROM git_db WHERE name = ?", (name,))
        finally:
            con.close()
        return "updated"
    except sqlite3.Error as e:
        return f"not updated: {e}"


def collect_cargo_home(ws, *, dry_run: bool = False, epoch_ns: int | None = None,
                       timeout: float = LOCK_TIMEOUT_S) -> dict:
    home = Path(ws.cargo_home)
    rep = Report()
    result = {"cargo_home": str(home)}
    refs = _lock_packages(Path(ws.root) / "Cargo.lock")
    if refs is None:
        result["skipped"] = "no readable Cargo.lock: cannot tell what is referenced"
        return {**result, **rep.as_dict()}
    if not home.is_dir():
        result["skipped"] = "no CARGO_HOME"
        return {**result, **rep.as_dict()}
    crates, gits = refs
    recent = _global_cache_recent(home, None if epoch_ns is None else epoch_ns // 10**9)
    git_idents = {g[0] for g in gits}
    git_segs = {g[1] for g in gits}
    plan: list[tuple[Path, str, str, str]] = []   # path, table, parent, name

    def judge(entry, table: str, parent: str, referenced: bool, removable: bool) -> None:
        """Keep what Cargo.lock references or cargo used since the epoch; plan to remove the rest.
        Kept directories (extracted sources, git dbs and checkouts) are not sized: walking them
        cost more than the rest of a save's GC, so kept bytes count files (.crate) only."""
        if referenced:
            rep.keep("referenced", file_bytes(entry))
        elif entry.name in recent[table]:
            rep.keep("used-since-restore", file_bytes(entry))
        elif removable:
            plan.append((Path(entry.path), table, parent, entry.name))
            rep.remove("cargo-home-unreferenced", tree_bytes(Path(entry.path)))

    for reg in scandir(home / "registry" / "cache"):
        for f in scandir(Path(reg.path)):
            stem = f.name[:-6] if f.name.endswith(".crate") else f.name
            judge(f, "registry_crate", reg.name, stem in crates, f.name.endswith(".crate"))
    for reg in scandir(home / "registry" / "src"):
        for d in scandir(Path(reg.path)):
            judge(d, "registry_src", reg.name, d.name in crates, d.is_dir(follow_symlinks=False))
    for db in scandir(home / "git" / "db"):
        seg = db.name.rsplit("-", 1)[0]
        # exact ident; the last-segment fallback only if no exact match exists for that segment
        exact = db.name in git_idents
        fallback = seg in git_segs and not any(i.startswith(seg + "-") and (home / "git" / "db" / i).exists()
                                                for i in git_idents)
        judge(db, "git_db", "", exact or fallback, db.is_dir(follow_symlinks=False))
    for co in scandir(home / "git" / "checkouts"):
        seg = co.name.rsplit("-", 1)[0]
        revs = [g[2] for g in gits if g[0] == co.name or (g[1] == seg and co.name not in git_idents
                                                           and not (home / "git" / "checkouts" / g[0]).exists())]
        for rev_dir in scandir(Path(co.path)):
            judge(rev_dir, "git_checkout", co.name, any(r.startswith(rev_dir.name) for r in revs),
                  rev_dir.is_dir(follow_symlinks=False))
    result["unreferenced"] = sorted(p.relative_to(home).as_posix() for p, *_ in plan)
    if not dry_run:
        Deleter([home], dry_run=False).empty_trash()   # leftovers of an interrupted GC
    if not dry_run and plan:
        deleter = Deleter([home], dry_run=False)
        removed = {"registry_crate": [], "registry_src": [], "git_db": [], "git_checkout": []}
        # cargo's MutateExclusive: the "mutate" lock first, then the "download" lock. Builds of
        # other workspaces sharing this CARGO_HOME hold "mutate" shared: don't wait for them long.
        try:
            with exclusive_flock(home / ".package-cache-mutate", "CARGO_HOME package cache", min(timeout, 30.0)), \
                    exclusive_flock(home / ".package-cache", "CARGO_HOME package cache", min(timeout, 30.0)):
                for path, table, parent, name in plan:
                    deleter.discard(path)
                    removed[table].append((parent, name))
                result["global_cache"] = _forget_in_global_cache(home, removed)
                deleter.empty_trash()
        except RsnapError as e:
            result["skipped"] = f"{e}; nothing removed from CARGO_HOME"
            rep.removed.clear()
    result["bin_untouched"] = True
    return {**result, **rep.as_dict()}
