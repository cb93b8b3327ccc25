"""Drive a real BuildKit (dockerd's built-in one, Debian docker.io 20.10) for the recipe tests.

* :func:`buildkit` runs ``.ci/buildkit-setup.sh`` once per session: installs docker.io when
  missing, starts dockerd when none answers, builds the local images ``rsnap-base:bookworm``
  and ``rsnap-rust:<rustc version>`` (the host's toolchain copied in; no registry is reachable).
  Then it builds ``rsnap-rust-test:<wheel digest>``: that image plus this checkout's rsnap
  wheel and its dependencies in /wheels with ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` set, so the
  recipes' own ``pip install rsnap`` lines run unchanged and offline.
* :func:`build` runs ``docker build --progress=plain`` and parses the cargo lines of the log
  (``Compiling <pkg> v...``) and rsnap's restore line.

What this BuildKit (0.8, Dockerfile frontend built into dockerd 20.10) does not have: named
build contexts (``--build-context``), ``COPY --exclude``, ``# syntax=`` (needs a registry).
Checked here: COPY and bind mounts keep the context files' mtimes, nanoseconds included.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = os.environ.get("RSNAP_DOCKER", "/usr/bin/docker")
SETUP = REPO_ROOT / ".ci" / "buildkit-setup.sh"
STATE = Path(os.environ.get("RSNAP_BK_STATE", "/tmp/rsnap-buildkit"))
RECIPE = REPO_ROOT / "examples" / "buildkit" / "Dockerfile"

_COMPILING = re.compile(r"^#\d+ [\d.]+\s+Compiling (\S+) v")
_RSNAP = re.compile(r"^#\d+ [\d.]+ (rsnap: .*)$")


class Unavailable(Exception):
    """No BuildKit can be started here (the reason is the message)."""


def env() -> dict:
    return dict(os.environ, DOCKER_BUILDKIT="1")


def docker(*args, check=True, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *map(str, args)], env=dict(env(), **(extra_env or {})),
                          capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise AssertionError(f"docker {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Session:
    rust_image: str       # rsnap-rust:<ver>: toolchain, python3, no rsnap
    test_image: str       # + offline wheels of this checkout's rsnap
    started_pid: int | None


_session: Session | None = None


def setup() -> Session:
    """Run the setup script and build the test image, once per process (test_buildkit.py and
    test_earthly.py share it); raises Unavailable with the reason."""
    global _session
    if _session is None:
        _session = _setup()
    return _session


def _setup() -> Session:
    if os.geteuid() != 0 and not os.access("/var/run/docker.sock", os.W_OK):
        raise Unavailable("not root and no writable /var/run/docker.sock")
    if shutil.which("rustc") is None:
        raise Unavailable("no rustc on PATH (the image gets the host's toolchain)")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=env())
    if proc.returncode:
        raise Unavailable(f".ci/buildkit-setup.sh failed ({proc.returncode}): {proc.stderr[-2000:]}")
    started = re.search(r"^dockerd-started (\d+)$", proc.stdout, re.M)
    rust_image = re.search(r"^rust-image (\S+)$", proc.stdout, re.M)[1]
    return Session(rust_image, make_test_image(rust_image), int(started[1]) if started else None)


def wheels(dest: Path) -> None:
    """rsnap's wheel from this checkout plus its dependencies (built on the host)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(dest)]
    subprocess.run([*pip, "--no-deps", str(REPO_ROOT)], check=True, capture_output=True)
    subprocess.run([*pip, "zstandard>=0.22", "xxhash>=3.4", "pyfastcdc>=0.3,<0.4", "typer>=0.12", "opendal>=0.47,<0.48",
                    "setuptools>=68", "wheel"],  # the last two: the Earthfile's +dist builds the wheel
                   check=True, capture_output=True)


def make_test_image(rust_image: str) -> str:
    with tempfile.TemporaryDirectory(prefix="rsnap-bk-img-") as tmp:
        ctx = Path(tmp)
        wheels(ctx / "wheels")
        h = hashlib.sha256(rust_image.encode())
        for w in sorted((ctx / "wheels").iterdir()):
            h.update(w.name.encode() + w.read_bytes())
        tag = f"rsnap-rust-test:{h.hexdigest()[:12]}"
        if docker("image", "inspect", tag, check=False).returncode:
            (ctx / "Dockerfile").write_text(
                f"FROM {rust_image}\nCOPY wheels /wheels\nENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels\n")
            docker("build", "--network=host", "-q", "-t", tag, ctx)
    return tag


def stop(session: Session) -> None:
    """Stop dockerd if (and only if) this session started it, by its pid."""
    global _session
    _session = None
    if session.started_pid:
        subprocess.run(["kill", str(session.started_pid)], check=False)


def prune() -> None:
    """Wipe BuildKit's whole cache: layers and every cache mount (a fresh runner)."""
    docker("builder", "prune", "-af")


@dataclass
class Build:
    returncode: int
    log: str
    seconds: float

    @property
    def compiled(self) -> list[str]:
        """Packages cargo compiled, in log order (one entry per `Compiling` line)."""
        return [m[1] for line in self.log.splitlines() if (m := _COMPILING.match(line))]

    @property
    def rsnap_lines(self) -> list[str]:
        return [m[1] for line in self.log.splitlines() if (m := _RSNAP.match(line))]

    def check(self) -> "Build":
        if self.returncode:
            raise AssertionError(f"docker build failed ({self.returncode}):\n{self.log[-6000:]}")
        return self


def build(context: Path, dockerfile: Path, out: Path | None = None, target: str | None = None,
          secrets: dict[str, str] | None = None, **build_args: str) -> Build:
    """`secrets`: id -> value, passed as `--secret id=<id>,env=<id>` (the value only in the CLI's
    environment, never on its command line or in a build arg)."""
    import time
    cmd = ["build", "--network=host", "--progress=plain", "-f", dockerfile]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    for k in secrets or {}:
        cmd += ["--secret", f"id={k},env={k}"]
    if target:
        cmd += ["--target", target]
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        cmd += ["-o", f"type=local,dest={out}"]
    started = time.monotonic()
    proc = docker(*cmd, context, check=False, extra_env=secrets)
    return Build(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)


def fresh_copy(src: Path, dest: Path) -> Path:
    """A copy with new mtimes everywhere, like a fresh `git clone` on a new runner."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("target", ".git"))
    return dest


def path_only_ws(dest: Path) -> Path:
    """fixtures/ws without its registry and git dependencies (no servers needed in the build).

    Packages: ws-core <- ws-util <- app, ws-macros (proc-macro, used by ws-util), ws-gen
    (build.rs; depends on ws-core). A Cargo.lock is generated offline.
    """
    src = REPO_ROOT / "fixtures" / "ws"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("target", "Cargo.lock"))
    manifest = dest / "crates" / "app" / "Cargo.toml"
    text = manifest.read_text()
    text = re.sub(r"^(regdep|regsys|gitdep) = .*\n", "", text, flags=re.M)
    text = text.split("[features]")[0]
    manifest.write_text(text)
    main = dest / "crates" / "app" / "src" / "main.rs"
    main.write_text("".join(l for l in main.read_text().splitlines(True)
                            if not re.search(r"\b(regdep|regsys|gitdep)::", l)))
    for t in (dest / "crates" / "app" / "tests").glob("*.rs"):
        t.unlink()
    subprocess.run(["cargo", "generate-lockfile", "--offline"], cwd=dest, check=True, capture_output=True)
    return dest


def merge_store(exported: Path, seed: Path) -> int:
    """`cp -a exported/. seed/`: the objects a build exported join the host-side store."""
    n = 0
    for p in exported.rglob("*"):
        if p.is_file():
            t = seed / p.relative_to(exported)
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, t)
            n += 1
    return n
