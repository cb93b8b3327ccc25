"""examples/buildkit/Dockerfile executed by a real BuildKit (dockerd 20.10's built-in one).

Each build's "units compiled" are the `Compiling <pkg>` lines cargo printed in the RUN step,
read from `docker build --progress=plain`; an empty list with a successful build means cargo
ran and found everything fresh (the RUN itself is never a layer-cache hit in these tests: every
build starts from a fresh copy of the sources, whose content or mtimes differ from the last).

Skipped, with the reason, when no BuildKit can be started (no root/docker socket, no rustc,
no docker.io package reachable); the S3 test also when moto[server] is not installed (its
server runs on the host's loopback, which `--network=host` builds reach). Needs about 2-3
minutes once the base image exists.
"""

from __future__ import annotations

import re
import subprocess

import pytest

import buildkit_util as bk


@pytest.fixture(autouse=True)
def empty_cache(buildkit):
    """Every test starts from an empty BuildKit cache (the recipe's cache mount ids are fixed,
    so tests would otherwise share mounts)."""
    bk.prune()


def _args(session, tag: str, **extra) -> dict:
    return dict(RUST_IMAGE=session.test_image, RSNAP_PIP="rsnap", **extra)   # from the image's offline wheels


def _run(binary) -> str:
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout


def test_second_build_with_cache_mounts_kept_compiles_nothing(buildkit, tmp_path):
    """(a) The bundled example twice, cache mounts kept; the second build is a fresh copy of the
    sources (new mtimes) with a changed non-Rust file, so BuildKit re-runs the RUN step."""
    src = bk.REPO_ROOT / "examples" / "hello"
    ctx = bk.fresh_copy(src, tmp_path / "ctx")
    (ctx / ".rsnap-seed").mkdir()
    first = bk.build(ctx, bk.RECIPE, tmp_path / "out1", **_args(buildkit, "a", CARGO_ARGS="build --release", BIN="hx-app")).check()
    assert sorted(first.compiled) == ["hx-app", "hx-engine", "hx-model", "hx-text"], first.log[-3000:]

    ctx = bk.fresh_copy(src, tmp_path / "ctx")
    (ctx / ".rsnap-seed").mkdir()
    (ctx / "CHANGELOG").write_text("a commit that touches no Rust source\n")
    second = bk.build(ctx, bk.RECIPE, tmp_path / "out2", **_args(buildkit, "a", CARGO_ARGS="build --release", BIN="hx-app")).check()
    last_step = re.findall(r"\[build (\d+)/\1\] RUN", second.log)   # the recipe's last step: the build
    assert "Finished" in second.log and last_step, second.log[-3000:]
    assert "CACHED" not in second.log.split(f"[build {last_step[0]}/{last_step[0]}] RUN")[1].split("\n#")[0]
    assert second.compiled == [], second.log[-3000:]
    assert _run(tmp_path / "out2" / "bin" / "hx-app").splitlines()[0] == "hello, rsnap"


def test_wiped_buildkit_cache_refilled_from_store_then_one_line_edit(buildkit, tmp_path):
    """(b) The store survives `docker builder prune -af` outside BuildKit: exported from the
    build (`-o type=local`, RSNAP_EXPORT=1), merged into a host dir, which the next build gets
    back in its context as the seed of the (now empty) store cache mount. (c) Then a one-line
    edit in the bottom crate compiles exactly it and its dependents; the artifact shows it."""
    ws = bk.path_only_ws(tmp_path / "ws")
    seed = tmp_path / "host-store"          # the store kept by the CI system, outside BuildKit
    seed.mkdir()
    args = _args(buildkit, "b", CARGO_ARGS="build --release --locked", RSNAP_EXPORT="1")

    def run_build(name):
        ctx = bk.fresh_copy(ws, tmp_path / "ctx")
        bk.merge_store(seed, ctx / ".rsnap-seed")
        (ctx / ".rsnap-seed").mkdir(exist_ok=True)
        b = bk.build(ctx, bk.RECIPE, tmp_path / name, **args).check()
        exported = tmp_path / name / "rsnap-store"
        assert exported.is_dir() and any(exported.rglob("*")), "the build exported no new store objects"
        bk.merge_store(exported, seed)
        return b

    first = run_build("out1")
    assert sorted(first.compiled) == ["app", "ws-core", "ws-gen", "ws-macros", "ws-util"], first.log[-3000:]

    bk.prune()                               # a fresh runner: no layers, no cache mounts
    second = run_build("out2")
    assert any("seeding it from .rsnap-seed" in line for line in second.rsnap_lines), second.log[-3000:]
    assert not any("miss" in line for line in second.rsnap_lines), second.rsnap_lines
    assert second.compiled == [], second.log[-3000:]
    assert "core: ws-core rev=1" in _run(tmp_path / "out2" / "bin" / "app")

    lib = ws / "crates" / "core" / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace("REVISION: u32 = 1;", "REVISION: u32 = 2;"))
    third = run_build("out3")
    assert sorted(third.compiled) == ["app", "ws-core", "ws-gen", "ws-util"], third.log[-3000:]
    assert "core: ws-core rev=2" in _run(tmp_path / "out3" / "bin" / "app")


def test_one_line_edit_in_bundled_example(buildkit, tmp_path):
    """(c) on the bundled example, warm runner: edit the leaf lib; hx-text and hx-app compile."""
    src = bk.REPO_ROOT / "examples" / "hello"
    ws = bk.fresh_copy(src, tmp_path / "ws")
    args = _args(buildkit, "c", CARGO_ARGS="build --release", BIN="hx-app")

    def run_build(name):
        ctx = bk.fresh_copy(ws, tmp_path / "ctx")
        (ctx / ".rsnap-seed").mkdir()
        return bk.build(ctx, bk.RECIPE, tmp_path / name, **args).check()

    run_build("out1")
    lib = ws / "crates" / "text" / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace('"hello, {name}"', '"hi there, {name}"'))
    edited = run_build("out2")
    assert sorted(edited.compiled) == ["hx-app", "hx-text"], edited.log[-3000:]
    assert _run(tmp_path / "out2" / "bin" / "hx-app").splitlines()[0] == "hi there, rsnap"


# Distinctive credentials (moto accepts any): the test checks they never show in a build log.
S3_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDRSNAPBUILDKIT0001", "AWS_SECRET_ACCESS_KEY": "bk-secret-never-logged-4f2a"}


def test_s3_store_refills_wiped_runner_then_one_line_edit(buildkit, moto_server, tmp_path):
    """The recipe with RSNAP_STORE=s3://... (moto on the host's loopback): endpoint and region as
    build args, credentials as BuildKit secrets (never in the log). After `docker builder prune
    -af` (no layers, no cache mounts) the build restores from the bucket and compiles nothing;
    after another prune, a one-line edit compiles the edited crate and its dependents only, and
    the binary shows it."""
    moto_server.create_bucket("rsnap-bk")
    ws = bk.path_only_ws(tmp_path / "ws")
    args = _args(buildkit, "s3", CARGO_ARGS="build --release --locked", RSNAP_STORE="s3://rsnap-bk/ci",
                 AWS_ENDPOINT_URL=moto_server.endpoint, AWS_REGION="us-east-1")

    def run_build(name):
        ctx = bk.fresh_copy(ws, tmp_path / "ctx")      # no .rsnap-seed: the bucket is the store
        b = bk.build(ctx, bk.RECIPE, tmp_path / name, secrets=S3_SECRETS, **args).check()
        for value in S3_SECRETS.values():
            assert value not in b.log
        return b

    first = run_build("out1")
    assert sorted(first.compiled) == ["app", "ws-core", "ws-gen", "ws-macros", "ws-util"], first.log[-3000:]
    status, listing = moto_server.request("GET", "/rsnap-bk?list-type=2&prefix=ci/")
    assert status == 200 and b"<Key>ci/" in listing, listing[:500]

    bk.prune()                               # a fresh runner: no layers, no cache mounts
    second = run_build("out2")
    assert any(re.search(r" hit \S+: wrote [1-9]", line) for line in second.rsnap_lines), second.rsnap_lines
    assert second.compiled == [], second.log[-3000:]
    assert "core: ws-core rev=1" in _run(tmp_path / "out2" / "bin" / "app")

    lib = ws / "crates" / "core" / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace("REVISION: u32 = 1;", "REVISION: u32 = 2;"))
    bk.prune()                               # again a fresh runner, now with an edit
    third = run_build("out3")
    assert sorted(third.compiled) == ["app", "ws-core", "ws-gen", "ws-util"], third.log[-3000:]
    assert "core: ws-core rev=2" in _run(tmp_path / "out3" / "bin" / "app")
