#!/usr/bin/env bash
# BuildKit for tests/test_buildkit*.py, tests/test_earthly*.py and bench/bench_buildkit.py.
#
# Idempotent. Installs docker.io + debootstrap when missing, starts dockerd when no daemon
# answers (no bridge, no iptables: builds use --network=host), and builds two local images
# (no image registry is needed or used):
#   rsnap-base:bookworm       debootstrap --variant=minbase of the host's Debian mirror
#   rsnap-rust:<rustc ver>    + python3/venv, gcc, git, and the host's own Rust toolchain
# Prints "dockerd-started <pid>" when it started a daemon (its pid is also in
# $RSNAP_BK_STATE/dockerd.pid); stop it with: kill "$(cat $RSNAP_BK_STATE/dockerd.pid)".
# Last line on stdout: "rust-image <tag>".
set -euo pipefail
DOCKER=${RSNAP_DOCKER:-/usr/bin/docker}
STATE=${RSNAP_BK_STATE:-/tmp/rsnap-buildkit}
mkdir -p "$STATE"
log() { echo "buildkit-setup: $*" >&2; }

if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io debootstrap"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >&2
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $STATE/dockerd.log)"
  setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$STATE/dockerd.log" 2>&1 </dev/null &
  echo $! >"$STATE/dockerd.pid"
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { log "dockerd did not come up"; tail -20 "$STATE/dockerd.log" >&2; exit 1; }
  echo "dockerd-started $(cat "$STATE/dockerd.pid")"
fi
export DOCKER_BUILDKIT=1

if ! "$DOCKER" image inspect rsnap-base:bookworm >/dev/null 2>&1; then
  # The first Debian (not security) mirror of the host's apt sources, deb822 or one-line form.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm from $mirror"
  for attempt in 1 2 3; do   # a mirror's transient download failure must not fail CI
    rm -rf "$STATE/rootfs"
    debootstrap --variant=minbase bookworm "$STATE/rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 && break
    tail -5 "$STATE/debootstrap.log" >&2
    [ "$attempt" = 3 ] && { log "debootstrap failed 3 times"; exit 1; }
    log "debootstrap attempt $attempt failed; retrying in $((attempt * 10)) s"; sleep $((attempt * 10))
  done
  tar -C "$STATE/rootfs" -c . | "$DOCKER" import - rsnap-base:bookworm >/dev/null
  rm -rf "$STATE/rootfs"
fi

sysroot=$(rustc --print sysroot)
ver=$(rustc -V | awk '{print $2}')
tag=rsnap-rust:$ver
if ! "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  log "building $tag (host toolchain $sysroot, trimmed to rustc/cargo/std)"
  ctx=$STATE/rust-ctx
  rm -rf "$ctx" && mkdir -p "$ctx/rust/bin" "$ctx/rust/lib/rustlib"
  cp -a "$sysroot/bin/rustc" "$(rustup which cargo 2>/dev/null || echo "$sysroot/bin/cargo")" "$ctx/rust/bin/"
  cp -a "$sysroot"/lib/*.so* "$ctx/rust/lib/"
  cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$ctx/rust/lib/rustlib/"
  cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM rsnap-base:bookworm
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv gcc libc6-dev git ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN rustc -V && cargo -V
DOCKERFILE
  for attempt in 1 2 3; do   # its apt-get downloads too
    "$DOCKER" build --network=host -q -t "$tag" "$ctx" >&2 && break
    [ "$attempt" = 3 ] && { log "building $tag failed 3 times"; exit 1; }
    sleep $((attempt * 10))
  done
  rm -rf "$ctx"
fi
echo "rust-image $tag"
