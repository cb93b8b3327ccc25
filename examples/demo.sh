#!/usr/bin/env bash
# rsnap's main job on the bundled example: build, save, fresh clone, restore, build again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rsnap-demo.XXXXXX")
export RSNAP_STORE="$work/store"
export CARGO_HOME="$work/cargo-home"   # the demo never touches your own ~/.cargo
git_q() { git -c user.name=rsnap-demo -c user.email=demo@rsnap.invalid "$@"; }

cp -r "$here/hello" "$work/origin"
(cd "$work/origin" && git_q init -q && git_q add -A && git_q commit -qm "example")
git clone -q "$work/origin" "$work/ws"
cd "$work/ws"

echo "== first CI run: restore (miss), build, save"
rsnap restore
cargo build
rsnap save

echo "== second CI run: fresh clone at the same path (every file gets a new mtime)"
cd "$work" && rm -rf ws && git clone -q origin ws && cd ws
rsnap restore
cargo build --message-format=json 2>/dev/null | python3 -c '
import json, sys
units = [m for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact"]
compiled = [u["target"]["name"] for u in units if not u["fresh"]]
print(f"cargo build after restore: {len(units)} units, {len(compiled)} compiled {compiled}")
sys.exit(1 if compiled else 0)'
./target/debug/app
echo "== demo workspace left in $work"
