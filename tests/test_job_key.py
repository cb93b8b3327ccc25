"""One key per CI job (issue 19), and the hint for cargo >= 1.99's incremental-off-under-CI."""
from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import given, strategies as st

from rsnap.cargo import incremental_ci, keys
from rsnap_util import cold_runner, rsnap

BASE_INPUTS = {"key_format": keys.KEY_FORMAT, "os": "linux", "arch": "x86_64", "rustc": "rustc 1.95.0\nrelease: 1.95.0",
               "host": "x86_64-unknown-linux-gnu", "target": "x86_64-unknown-linux-gnu", "workspace_root": "/w",
               "cargo_home": "/h", "cargo_lock": "abc", "rust_toolchain": {}, "cargo_config": {}, "env": {}}
job_names = st.text(min_size=0, max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------- the key's job part

def test_job_identity_order_of_sources():
    assert keys.job_identity({}) == ""
    assert keys.job_identity({"GITHUB_JOB": "test"}) == "test"
    assert keys.job_identity({"CI_JOB_NAME": "test: [linux]"}) == "test: [linux]"
    assert keys.job_identity({"GITHUB_JOB": "test", "CI_JOB_NAME": "other"}) == "test"
    assert keys.job_identity({"RSNAP_JOB": "shared", "GITHUB_JOB": "test"}) == "shared"
    assert keys.job_identity({"RSNAP_JOB": "", "GITHUB_JOB": "test"}) == "", "an empty RSNAP_JOB opts out"
    assert keys.job_identity({"GITHUB_JOB": "", "CI_JOB_NAME": "lint"}) == "lint"


@given(job_names, job_names)
def test_jobs_split_keys_but_share_the_family(a, b):
    ka, kb = (keys.default_key({**BASE_INPUTS, "job": j}) for j in (a, b))
    assert keys.validate_key(ka) == ka
    assert len(ka.split("-")) == 6
    assert (ka == kb) == (a == b)
    family = keys.family_prefix(BASE_INPUTS)
    assert ka.startswith(family) and kb.startswith(family)
    assert ka.startswith(keys.job_prefix({**BASE_INPUTS, "job": a}))
    assert keys.fallback_prefixes({**BASE_INPUTS, "job": a}) == [keys.job_prefix({**BASE_INPUTS, "job": a}), family]
    # the part after the job is the same for both: only the job tells them apart
    assert ka.rsplit("-", 1)[1] == kb.rsplit("-", 1)[1]


# ---------------------------------------------------------------- the incremental hint's decision

@given(st.integers(0, 3), st.integers(0, 250), st.integers(0, 9), st.sampled_from(["", "-nightly", "-beta.2"]))
def test_release_is_parsed_from_rustc_and_cargo_version_lines(major, minor, patch, channel):
    v = f"{major}.{minor}.{patch}{channel}"
    vv = f"rustc {v} (0123abcd 2026-10-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: {v}\nLLVM version: 21.1.0\n"
    for text in (vv, f"cargo {v} (0123abcd 2026-09-24)", f"rustc {v}"):
        assert incremental_ci.release(text) == (major, minor)
        assert incremental_ci.turns_off_under_ci(text) == ((major, minor) >= (1, 99))
    assert incremental_ci.release("no version here") is None


CARGO_199 = "rustc 1.99.0 (0123abcd 2026-09-28)\nrelease: 1.99.0\n"
CARGO_198 = "rustc 1.98.1\nrelease: 1.98.1\n"


def _hint(env, version=CARGO_199, configs=(), has_incremental=True):
    return incremental_ci.hint(env, version, list(configs), lambda: has_incremental)


def test_hint_only_when_every_condition_holds(tmp_path):
    assert "CARGO_INCREMENTAL=1" in _hint({"CI": "true"})
    assert _hint({"TF_BUILD": "True"}), "cargo's own CI check also looks at TF_BUILD"
    assert _hint({}) is None, "not under CI"
    assert _hint({"CI": "true"}, version=CARGO_198) is None, "cargo before 1.99 keeps incremental on"
    assert _hint({"CI": "true"}, has_incremental=False) is None, "nothing incremental to lose"
    for name in ("CARGO_INCREMENTAL", "CARGO_BUILD_INCREMENTAL"):
        for value in ("0", "1"):
            assert _hint({"CI": "true", name: value}) is None, f"{name}={value} is explicit"


def test_hint_reads_build_incremental_but_not_profiles_from_cargo_config(tmp_path):
    build = tmp_path / "build.toml"
    build.write_text("[build]\nincremental = true\n")
    profile = tmp_path / "profile.toml"
    profile.write_text("[profile.dev]\nincremental = true\n")   # loses to CI in cargo's precedence
    broken = tmp_path / "broken.toml"
    broken.write_text("[build\n")
    assert _hint({"CI": "1"}, configs=[build]) is None
    assert _hint({"CI": "1"}, configs=[profile, broken, tmp_path / "missing.toml"])
    assert _hint({"CI": "1"}, configs=[broken, build]) is None


# ---------------------------------------------------------------- two CI jobs on one store

def _job_run(ws, store, job: str, cargo_args: tuple[str, ...]):
    """One CI run of `job`: a new runner (fresh clone, empty target and CARGO_HOME caches),
    `rsnap restore`, the job's cargo command, `rsnap save`."""
    cold_runner(ws)
    env = {"GITHUB_JOB": job}
    restored = rsnap(ws, store, "restore", "--json", env_extra=env).check().data
    built = ws.build(*cargo_args)
    saved = rsnap(ws, store, "save", "--json", env_extra=env).check().data
    return restored, built, saved


def _intact(store_path, saved: dict, manifest_bytes: bytes) -> None:
    """The snapshot a save wrote is still there as written, and every pack it names exists."""
    from rsnap.repository import repo
    from rsnap.store import open_store
    st_ = open_store(str(store_path), create=False)
    assert st_.get(saved["snapshot"]) == manifest_bytes
    m = repo.read_manifest(st_, saved["snapshot"])
    packs = sorted({loc[0] for loc in m.blobs.values()})
    assert packs and not st_.missing([repo.pack_name(p) for p in packs])


def test_two_jobs_alternate_without_thrashing(make_workspace, tmp_path):
    ws = make_workspace()
    store = tmp_path / "store"
    jobs = {"release": ("build", "--release"), "test": ("test",)}
    last_save: dict[str, tuple[dict, bytes]] = {}
    seen: dict[str, int] = {}
    from rsnap.store import open_store
    for run, job in enumerate(["release", "test", "release", "test", "release"]):
        restored, built, saved = _job_run(ws, store, job, jobs[job])
        seen[job] = seen.get(job, 0) + 1
        if run == 0:
            assert restored["result"] == "miss"
        elif seen[job] == 1:
            assert restored["result"] == "partial" and restored["fallback"] == "other-job", restored
            assert "CI job" in restored["key_differences"]
        else:
            assert restored["result"] == "exact" and restored["snapshot_key"] == last_save[job][0]["key"], restored
            assert not built.compiled_units() and not built.scripts_run, f"{job} run {seen[job]}: {built.summary()}"
        other = "test" if job == "release" else "release"
        if other in last_save:   # this job's save (and its GC) left the other job's snapshot alone
            _intact(store, *last_save[other])
        last_save[job] = (saved, open_store(str(store), create=False).get(saved["snapshot"]))
    assert last_save["release"][0]["key"] != last_save["test"][0]["key"]
    assert last_save["release"][0]["key"].rsplit("-", 2)[0] == last_save["test"][0]["key"].rsplit("-", 2)[0]

    # the incremental hint, on this machine's cargo (< 1.99) and with the version check moved to it
    cold_runner(ws)
    test_env = {"GITHUB_JOB": "test", "CI": "true"}
    assert _restore_with_ci(ws, store, test_env)["incremental_hint"] is None, "cargo < 1.99 keeps incremental on"
    lowered = _restore_with_ci(ws, store, test_env, off_from=(1, 0))
    assert lowered["result"] == "exact" and "CARGO_INCREMENTAL=1" in lowered["incremental_hint"]
    explicit = _restore_with_ci(ws, store, {**test_env, "CARGO_INCREMENTAL": "1"}, off_from=(1, 0))
    assert explicit["incremental_hint"] is None
    # a new key (CARGO_INCREMENTAL is a key input): this job's snapshot, and no claim about rebuilds
    assert explicit["result"] == "partial" and explicit["fallback"] == "job" and explicit["rebuild"] is None
    assert "env CARGO_INCREMENTAL" in explicit["key_differences"]
    release = _restore_with_ci(ws, store, {"GITHUB_JOB": "release", "CI": "true"}, off_from=(1, 0))
    assert release["result"] == "exact" and release["incremental_hint"] is None, "a release snapshot has none"
    text = _restore_with_ci(ws, store, test_env, off_from=(1, 0), as_json=False)
    assert sum(line.startswith("rsnap: hint: ") for line in text.splitlines()) == 1, text


def _restore_with_ci(ws, store, env_extra: dict, off_from=None, as_json: bool = True):
    """`rsnap restore` with CI set (the test helper removes it); `off_from` moves the version
    check to an older cargo, in the rsnap process itself (no stand-in cargo or rustc)."""
    patch = f"import rsnap.cargo.incremental_ci as c; c.OFF_UNDER_CI_FROM = {off_from!r}; " if off_from else ""
    code = patch + "from rsnap.cli.entry import main; main()"
    env = {**ws.env, "RSNAP_STORE": str(store), **env_extra}
    args = ["restore", "--json"] if as_json else ["restore"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ws.root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    if not as_json:
        return proc.stderr
    return json.loads(proc.stdout)


def test_rsnap_job_overrides_the_ci_job(built_workspace, tmp_path):
    ws = built_workspace
    a = rsnap(ws, tmp_path / "s", "key", "--json", env_extra={"GITHUB_JOB": "a"}).check().data
    b = rsnap(ws, tmp_path / "s", "key", "--json", env_extra={"GITHUB_JOB": "b", "RSNAP_JOB": "a"}).check().data
    gl = rsnap(ws, tmp_path / "s", "key", "--json", env_extra={"CI_JOB_NAME": "a"}).check().data
    assert a["key"] == b["key"] == gl["key"] and a["inputs"]["job"] == "a"
    none = rsnap(ws, tmp_path / "s", "key", "--json", env_extra={"GITHUB_JOB": "", "CI_JOB_NAME": ""}).check().data
    assert none["key"] != a["key"] and none["restore_prefix"] == a["restore_prefix"] and none["inputs"]["job"] == ""


def test_save_dedupes_against_its_own_jobs_snapshot_first():
    from rsnap.repository import repo
    fam = "linux-x86_64-aaaaaaaa-bbbbbbbb-"
    mine, other1, other2 = fam + "11111111-", fam + "22222222-", fam + "33333333-"
    found = [("s/o2", other2 + "c" * 16, 50), ("s/o1", other1 + "c" * 16, 40),
             ("s/m-old", mine + "d" * 16, 20), ("s/m", mine + "e" * 16, 30)]
    found.sort(key=lambda s: s[2], reverse=True)
    assert repo.nearest_first(found, mine + "f" * 16)[:2] == ["s/m", "s/o2"], "own job's newest, then the newest"
    assert repo.nearest_first(found, mine + "d" * 16)[:2] == ["s/m-old", "s/o2"], "the same key beats the same job"
    assert repo.nearest_first(found, "") == ["s/o2", "s/o1", "s/m", "s/m-old"]
    assert repo.nearest_first([], mine) == []
