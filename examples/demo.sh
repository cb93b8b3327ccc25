#!/usr/bin/env bash
# rsnap's main job on the bundled example (a 4-crate workspace: hx-model <- hx-engine <- hx-app,
# hx-text <- hx-app): build, save, fresh clone, restore, build again; then a one-line edit, where
# restore says which crates cargo will rebuild and why, and cargo compiles exactly those.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rsnap-demo.XXXXXX")
export RSNAP_STORE="$work/store"
export CARGO_HOME="$work/cargo-home"   # the demo never touches your own ~/.cargo
git_q() { git -c user.name=rsnap-demo -c user.email=demo@rsnap.invalid "$@"; }
results="$work/results.txt"

# cargo build, timed; prints and records which crates cargo compiled
build() {
    local label=$1 start end
    start=$(date +%s.%N)
    cargo build --message-format=json 2>/dev/null >"$work/build.json"
    end=$(date +%s.%N)
    python3 - "$label" "$start" "$end" "$work/build.json" "$results" <<'PY'
import json, sys
label, start, end, path, results = sys.argv[1:]
units = [m for m in map(json.loads, open(path)) if m.get("reason") == "compiler-artifact"]
compiled = sorted(u["target"]["name"] for u in units if not u["fresh"])
print(f"cargo build: {len(units)} units, {len(compiled)} compiled {compiled}")
with open(results, "a") as f:
    f.write(f"{label}\t{len(compiled)}\t{float(end) - float(start):.2f}\n")
PY
}

cp -r "$here/hello" "$work/origin"
rm -rf "$work/origin/target"
(cd "$work/origin" && git_q init -q && git_q add -A && git_q commit -qm "example")
git clone -q "$work/origin" "$work/ws"
cd "$work/ws"

echo "== first CI run: restore (miss), clean build, save"
rsnap restore
build "clean build"
rsnap save

echo "== second CI run: fresh clone at the same path (every file gets a new mtime)"
cd "$work" && rm -rf ws && git clone -q origin ws && cd ws
rsnap restore
build "restored, no change"
test "$(tail -1 "$results" | cut -f2)" = 0
./target/debug/hx-app

echo "== third CI run: a commit changes one line of hx-engine"
(cd "$work/origin" && sed -i 's/PACK_SIZE: u32 = 4;/PACK_SIZE: u32 = 5;/' crates/engine/src/lib.rs &&
    git_q commit -qam "pack by five")
cd "$work" && rm -rf ws && git clone -q origin ws && cd ws
rsnap restore                        # prints: 2 crates will rebuild: hx-engine (...changed), hx-app (...)
build "restored, one-line edit"
rsnap explain                        # what cargo rebuilt and why; flags any misprediction
./target/debug/hx-app

echo "== summary"
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"{'build':<26} {'crates compiled':>15} {'seconds':>8}")
for label, n, secs in rows:
    print(f"{label:<26} {n:>15} {secs:>8}")
PY
echo "== demo workspace left in $work"
