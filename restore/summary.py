"""The job summary of rsnap's actions: a few Markdown lines for $GITHUB_STEP_SUMMARY.

    python3 summary.py restore <restore.json>
    python3 summary.py save <save.json> [<explain.json>]

The restore's hit (exact, partial or miss, and which key), the crates cargo rebuilt and why (from
`rsnap explain --json` after the build), bytes and entries moved to and from the store, and
seconds per phase. Stdlib only: it runs with whatever python3 the runner has.
"""
import json
import sys


def human(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def phases(timings: dict, top: int = 5) -> str:
    total = timings.get("total")
    parts = sorted(((v, k) for k, v in timings.items() if k != "total" and v >= 0.01), reverse=True)[:top]
    head = f"{total:.1f} s" if total is not None else ""
    return head + (" (" + ", ".join(f"{k} {v:.1f}" for v, k in parts) + ")" if parts else "")


def traffic(r: dict) -> str:
    t = r.get("traffic") or {}
    down = f"{human(t.get('bytes_down'))} in {t.get('entries_down', 0)} entries down" if t else ""
    up = f"{human(t.get('bytes_up'))} in {t.get('entries_up', 0)} entries up" if t.get("entries_up") else ""
    return ", ".join(x for x in (down, up) if x)


def restore_rows(r: dict) -> list:
    result = r.get("result", "?")
    if result == "miss":
        hit = f"miss ({r.get('message') or 'no snapshot'}); looked for `{r.get('key', '')}`"
    else:
        hit = f"{result}: `{r.get('snapshot_key', '')}`" + ("" if result == "exact" else f" (wanted `{r.get('key', '')}`)")
    rows = [("hit", hit), ("store", f"`{r.get('store', '')}`")]
    if r.get("summary"):
        rows.append(("predicted", r["summary"]))
    rows += [("restored", f"{r.get('files_written', 0)} files, {human(r.get('bytes_written'))}"),
             ("moved", traffic(r)), ("seconds", phases(r.get("timings") or {}))]
    return rows


def save_rows(r: dict, explain: dict | None) -> list:
    rows = []
    if explain:
        rebuilt = explain.get("rebuilt") or []
        why = "; ".join(f"{u.get('package')} ({u.get('reason')})" for u in rebuilt[:10])
        more = f"; +{len(rebuilt) - 10} more" if len(rebuilt) > 10 else ""
        rows.append(("cargo rebuilt", f"{len(rebuilt)} of {explain.get('units', '?')} units" + (f": {why}{more}" if why else "")))
    rows += [("saved", f"`{r.get('key', '')}`: {r.get('files', 0)} files, {r.get('blobs_new', 0)} new blobs, "
                       f"{human(r.get('bytes_written'))} written in {r.get('packs_written', 0)} packs"),
             ("moved", traffic(r)), ("seconds", phases(r.get("timings") or {}))]
    return rows


def main(argv: list) -> None:
    kind, path = argv[1], argv[2]
    r = json.load(open(path))
    explain = json.load(open(argv[3])) if len(argv) > 3 else None
    rows = restore_rows(r) if kind == "restore" else save_rows(r, explain)
    print(f"### rsnap {kind}\n\n| | |\n|---|---|")
    for name, value in rows:
        if value:
            print(f"| {name} | {str(value).replace('|', '/')} |")
    print()


if __name__ == "__main__":
    main(sys.argv)
