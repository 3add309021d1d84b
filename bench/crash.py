"""Crash matrix, long: every fail point, many passes, with and without the broker, for minutes.

``.venv/bin/python bench/crash.py [--minutes 30] [--json FILE]`` runs the full crash matrix of
``tests/e2e/test_crash.py`` (``PERSONIFY_CRASH_MATRIX=full``: each fail point at several passes,
the engine killed with its embedded broker and alone) again and again until ``--minutes`` have
passed, and prints each case's runs and failures. Each case kills a running engine at its
point under a burst of 5,000 events of one visitor, light visitors, catalog changes and
erasures, restarts it and checks that every acknowledged event counts exactly once, none is
lost and every erased visitor stays erased. Exits non-zero if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from _proc import run_record

REPO = Path(__file__).resolve().parent.parent
PYTEST = (sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider")
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR) tests/e2e/test_crash\.py::\S+\[(.+)\]", re.M)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    env = {**os.environ, "PERSONIFY_CRASH_MATRIX": "full"}
    runs: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.minutes * 60 or rounds == 0:
        rounds += 1
        done = subprocess.run(
            [*PYTEST, "tests/e2e/test_crash.py"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        outcomes = _OUTCOME.findall(done.stdout)
        if not outcomes:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 2
        for outcome, case in outcomes:
            runs[case] += 1
            if outcome != "PASSED":
                failed[case] += 1
        elapsed = (time.monotonic() - started) / 60
        print(
            f"round {rounds}: {len(outcomes)} cases, {sum(failed.values())} failures so far "
            f"({elapsed:.1f} min)",
            flush=True,
        )
    print(f"\n{'case':<40} {'runs':>5} {'failed':>7}")
    for case in sorted(runs):
        print(f"{case:<40} {runs[case]:>5} {failed[case]:>7}")
    total = sum(runs.values())
    print(f"\n{total} kills and restarts in {rounds} rounds, {sum(failed.values())} failed")
    if args.json:
        record = run_record(args) | {"runs": dict(runs), "failed": dict(failed)}
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
