"""The never-stale state machine (tests/never_stale_machine.py) for a long run.

    python bench/bench_never_stale.py [--minutes 30] [--steps 10] [--root DIR]

Runs random examples of up to --steps rules each (every one from the start state) until
--minutes have passed, then prints the steps, kills landed and stale builds (the goal: 0).
Stops at the first failure and prints hypothesis's shrunk reproduction (the rules, in order,
with their arguments: they replay from the start state); exit 1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from cargo_util import create_workspace  # noqa: E402
from fixtures.tools import mkgitdep, mkregistry  # noqa: E402
from never_stale_machine import STATS, NeverStale, make_scene  # noqa: E402
from reliability_util import LANDED_KILLS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--steps", type=int, default=10, help="rules per example (at most)")
    ap.add_argument("--root", type=Path, help="work dir (default: a temp dir)")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="rsnap-never-stale-"))
    registry = mkregistry.serve(mkregistry.build_registry(mkregistry.default_crate_dirs(), root / "registry"))
    gitdep = root / "gitdep"
    mkgitdep.make_gitdep(gitdep)
    NeverStale.scene = make_scene(create_workspace(root / "ws", registry.index_url, gitdep.as_uri()))
    started = time.monotonic()
    deadline = started + args.minutes * 60
    examples, failure = 0, None
    try:
        while time.monotonic() < deadline and failure is None:
            # batches of 10: hypothesis starts each call with its simplest example
            run = settings(max_examples=10, stateful_step_count=args.steps, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck))
            try:
                run_state_machine_as_test(NeverStale, settings=run)
            except AssertionError as e:
                failure = e
            examples += 10
    finally:
        registry.stop()
    minutes = (time.monotonic() - started) / 60
    print(f"never-stale machine: {minutes:.1f} min, {examples} examples (batches of 10), "
          f"{STATS['steps']} steps, {sum(LANDED_KILLS.values())} kills landed "
          f"({', '.join(f'{k}={v}' for k, v in sorted(LANDED_KILLS.items()))}), gc {STATS['gc']}, "
          f"prunes {STATS['prunes']}, stale builds {STATS['stale_builds']}")
    if failure is not None:
        print(f"FAILED:\n{failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
