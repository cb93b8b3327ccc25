"""The Earthfile's functions and targets, translated (tests/earthly_translate.py) and run by a
real BuildKit; Earthly itself is not installed in CI. The translation-only tests need no docker.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import buildkit_util as bk
from earthly_translate import TranslateError, translate

EARTHFILE = bk.REPO_ROOT / "Earthfile"

# Targets a user's Earthfile would have, appended to a copy of ours (functions are local then).
USER_TARGETS = """
seeded:
    FROM rust:1.95-bookworm
    DO +INIT
    WORKDIR /example
    COPY --keep-ts examples/hello ./
    COPY store-seed /rsnap-seed
    DO +CARGO --args="build --release" --output="release/hx-app$" --seed=/rsnap-seed --export_to=/rsnap-export
    SAVE ARTIFACT target/release/hx-app AS LOCAL out/seeded/hx-app
    SAVE ARTIFACT /rsnap-export AS LOCAL out/seeded/store

# RESTORE, a plain cargo RUN on the function's cache mounts (lib/rust's shape), SAVE; any store.
halves:
    FROM rust:1.95-bookworm
    ARG --required store
    DO +INIT --store=$store
    WORKDIR /example
    COPY --keep-ts examples/hello ./
    DO +RESTORE --aws_access_key_id=AWS_ACCESS_KEY_ID --aws_secret_access_key=AWS_SECRET_ACCESS_KEY
    RUN --mount=$RSNAP_CARGO_HOME_CACHE --mount=$RSNAP_TARGET_CACHE cargo build --release
    DO +SAVE --output="release/hx-app$" --aws_access_key_id=AWS_ACCESS_KEY_ID --aws_secret_access_key=AWS_SECRET_ACCESS_KEY
    SAVE ARTIFACT target/release/hx-app AS LOCAL out/halves/hx-app
"""


# -- translation only ------------------------------------------------------------------------

def test_function_inlined_with_arguments_in_callers_context():
    df = translate(EARTHFILE.read_text(), "example", images={"rust:1.95-bookworm": "img"})
    assert "FROM img AS example" in df
    run = next(l for l in df.splitlines() if "cargo $args" in l)
    assert run.startswith("RUN --mount=type=cache,id=rsnap-target,sharing=locked,target=/example/target ")
    assert "args='build --release';" in run and "output='release/hx-app$';" in run
    assert "COPY --from=dist--artifacts /*.whl /tmp/rsnap-dist/" in df
    assert "COPY --from=example /example/target/release/hx-app /out/example/hx-app" in df
    assert "ENV RSNAP_STORE=/rsnap/store" in df


def test_secrets_become_mounts_exported_to_the_command_and_empty_ids_drop_them():
    df = translate(EARTHFILE.read_text() + USER_TARGETS, "halves", args={"store": "s3://b/p"})
    restore = next(l for l in df.splitlines() if l.endswith("rsnap restore"))
    assert "--mount=type=secret,id=AWS_ACCESS_KEY_ID,required=true" in restore
    assert 'AWS_SECRET_ACCESS_KEY="$(cat /run/secrets/AWS_SECRET_ACCESS_KEY)"; export AWS_SECRET_ACCESS_KEY;' in restore
    assert "id=AWS_SESSION_TOKEN" not in df            # --aws_session_token left empty: no secret
    assert "ENV RSNAP_STORE=s3://b/p" in df
    cargo = next(l for l in df.splitlines() if l.endswith("cargo build --release"))
    assert cargo == ("RUN --mount=type=cache,id=rsnap-cargo-home,sharing=locked,target=/rsnap/cargo-home "
                     "--mount=type=cache,id=rsnap-target,sharing=locked,target=/example/target cargo build --release")


@pytest.mark.parametrize("line, message", [
    ("    SAVE IMAGE foo", "SAVE"),
    ("    IF true", "IF: not in the supported"),
    ("    RUN --mount=type=bind,target=/x true", "cache mounts only"),
    ("    RUN --push true", "RUN flag"),
    ("    RUN --secret A=b/c true", "not an env var name and secret id"),
    ("    DO rsnap+CARGO --args=build", "only local functions"),
    ("    DO +CARGO", "args is required"),
    ("    COPY --chmod=755 a b", "COPY flags"),
])
def test_refuses_what_it_does_not_model(line, message):
    text = EARTHFILE.read_text() + f"\nbad:\n    FROM x\n{line}\n"
    with pytest.raises(TranslateError, match=message):
        translate(text, "bad")


# -- through BuildKit ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def buildkit(buildkit_session):
    bk.prune()
    return buildkit_session


def _context(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(bk.REPO_ROOT / name, ctx / name)
    shutil.copytree(bk.REPO_ROOT / "rsnap", ctx / "rsnap", ignore=shutil.ignore_patterns("__pycache__"))
    bk.fresh_copy(bk.REPO_ROOT / "examples" / "hello", ctx / "examples" / "hello")
    (ctx / "Earthfile").write_text(EARTHFILE.read_text() + USER_TARGETS)
    (ctx / "store-seed").mkdir()
    return ctx


def _earthly_build(session, ctx, target, args=None, secrets=None):
    """`earthly +target --k=v --secret id` (secrets: id -> value, from the CLI's environment)."""
    images = {"rust:1.95-bookworm": session.test_image, "python:3.11-slim-bookworm": session.test_image}
    dockerfile = ctx.parent / f"{target}.Dockerfile"
    dockerfile.write_text(translate((ctx / "Earthfile").read_text(), target, images, args))
    out = ctx.parent / "out"
    b = bk.build(ctx, dockerfile, out, target=f"{target}--local", secrets=secrets).check()
    return b, out


def _run(path):
    """The first line the bundled example prints (its greeting)."""
    return subprocess.run([str(path)], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def test_example_target_then_one_line_edit(buildkit, tmp_path):
    """+example through DO +INIT / DO +CARGO --output; then an edit in the leaf lib on the warm
    runner compiles just hx-text and hx-app, and the artifact shows it."""
    ctx = _context(tmp_path)
    first, out = _earthly_build(buildkit, ctx, "example")
    assert sorted(first.compiled) == ["hx-app", "hx-engine", "hx-model", "hx-text"], first.log[-3000:]
    assert _run(out / "out" / "example" / "hx-app") == "hello, rsnap"

    lib = ctx / "examples" / "hello" / "crates" / "text" / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace('"hello, {name}"', '"hello from earthly, {name}"'))
    second, out = _earthly_build(buildkit, ctx, "example")
    assert sorted(second.compiled) == ["hx-app", "hx-text"], second.log[-3000:]
    assert any(" hit " in l for l in second.rsnap_lines), second.rsnap_lines
    assert _run(out / "out" / "example" / "hx-app") == "hello from earthly, rsnap"


def test_store_seeded_after_prune_builds_nothing(buildkit, tmp_path):
    """CARGO --seed/--export_to: the store objects leave BuildKit with SAVE ARTIFACT AS LOCAL,
    `docker builder prune -af` wipes every cache mount, the next build is seeded and fresh."""
    ctx = _context(tmp_path)
    bk.prune()
    first, out = _earthly_build(buildkit, ctx, "seeded")
    assert sorted(first.compiled) == ["hx-app", "hx-engine", "hx-model", "hx-text"], first.log[-3000:]
    assert bk.merge_store(out / "out" / "seeded" / "store", ctx / "store-seed") > 0

    bk.prune()
    bk.fresh_copy(bk.REPO_ROOT / "examples" / "hello", ctx / "examples" / "hello")  # new mtimes
    second, out = _earthly_build(buildkit, ctx, "seeded")
    assert any("seeding it from /rsnap-seed" in l for l in second.rsnap_lines), second.log[-3000:]
    assert second.compiled == [], second.log[-3000:]
    assert _run(out / "out" / "seeded" / "hx-app") == "hello, rsnap"


# Distinctive credentials (moto accepts any): they must never show in a build log.
S3_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDRSNAPEARTHLY0001", "AWS_SECRET_ACCESS_KEY": "earthly-secret-never-logged-9c1d"}


def test_halves_with_s3_store_after_prune_build_nothing(buildkit, moto_server, tmp_path):
    """DO +RESTORE, a plain `RUN --mount=$RSNAP_CARGO_HOME_CACHE --mount=$RSNAP_TARGET_CACHE
    cargo build`, DO +SAVE --output, with INIT --store=s3://... (endpoint and region in the URL)
    and credentials as secrets: `docker builder prune -af` wipes every cache mount and layer,
    the next build restores from the bucket and compiles 0 units."""
    moto_server.create_bucket("rsnap-earthly")
    store = f"s3://rsnap-earthly/halves?endpoint={moto_server.endpoint}&region=us-east-1"
    ctx = _context(tmp_path)
    bk.prune()
    first, out = _earthly_build(buildkit, ctx, "halves", {"store": store}, S3_SECRETS)
    assert sorted(first.compiled) == ["hx-app", "hx-engine", "hx-model", "hx-text"], first.log[-3000:]
    assert _run(out / "out" / "halves" / "hx-app") == "hello, rsnap"

    bk.prune()
    bk.fresh_copy(bk.REPO_ROOT / "examples" / "hello", ctx / "examples" / "hello")  # new mtimes
    second, out = _earthly_build(buildkit, ctx, "halves", {"store": store}, S3_SECRETS)
    assert any(re.search(r" hit \S+: wrote [1-9]", l) for l in second.rsnap_lines), second.log[-3000:]
    assert second.compiled == [], second.log[-3000:]
    assert _run(out / "out" / "halves" / "hx-app") == "hello, rsnap"
    for b in (first, second):
        for value in S3_SECRETS.values():
            assert value not in b.log
