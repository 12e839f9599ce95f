"""Regenerate every published number at the checked-out commit.

Run from the repository root::

    python -m benchmarks all            # every benchmark of benchmarks/registry.py (hours), then the README tables
    python -m benchmarks all --quick    # the reduced grids (results/*.quick.*), then the README check
    python -m benchmarks list           # the benchmarks, their commands and last durations
    python -m benchmarks suite joint    # some of them

Each benchmark runs as its own process (``python -m benchmarks.<module> ...``, output shown as it
comes) and writes ``benchmarks/results/<name>[.quick].{json,md}`` with its run record (commit,
dirty tree, machine, times, command). A benchmark that fails does not stop the others; the exit
status is non-zero if any failed. An interrupted run resumes: task benchmarks reuse the tasks
this commit already measured (``benchmarks/cache/rows``, ``--fresh`` to measure again), data_aware
its finished keeps. The full form then renders the README's tables from the results
(``benchmarks.render_readme``); the quick form only checks that the README matches the full
results (quick numbers are never published).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT
from benchmarks.registry import BENCHMARKS, benchmark


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run(names: list[str], quick: bool, fresh: bool) -> int:
    """Run the named benchmarks one after another; the number that failed."""
    failed, started = [], time.perf_counter()
    for index, name in enumerate(names, 1):
        entry = benchmark(name)
        if entry.command(quick) is None:
            print(f"[{index}/{len(names)}] {name}: no quick form, skipped", flush=True)
            continue
        command = [sys.executable, *entry.command(quick)] + (["--fresh"] if fresh and entry.module in _CACHED else [])
        expected = entry.quick_minutes if quick else entry.minutes
        print(f"[{index}/{len(names)}] {name}: {' '.join(['python', *command[1:]])}"
              + (f" (last run ~{expected:g} min)" if expected else ""), flush=True)
        began = time.perf_counter()
        code = subprocess.run(command, cwd=REPO_ROOT).returncode
        status = "done" if code == 0 else f"FAILED (exit {code})"
        print(f"[{index}/{len(names)}] {name}: {status} in {_minutes(time.perf_counter() - began)}; "
              f"{_minutes(time.perf_counter() - started)} so far", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return len(failed)


_CACHED = {"benchmarks.global_allocation", "benchmarks.sparse_residual", "benchmarks.joint", "benchmarks.suite",
           "benchmarks.recovery", "benchmarks.width"}
"""Modules built on `benchmark_main`, which take ``--fresh``."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", metavar="all|list|NAME",
                        help=f"'all', 'list', or some of: {', '.join(b.name for b in BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="reduced grids, written to results/*.quick.*")
    parser.add_argument("--fresh", action="store_true", help="measure again what this commit already measured")
    args = parser.parse_args(argv)
    if args.names == ["list"]:
        for b in BENCHMARKS:
            quick = f"quick ~{b.quick_minutes:g} min" if b.command(True) else "no quick form"
            print(f"{b.name:18} python {' '.join(b.command(False))}  (~{b.minutes:g} min; {quick})")
        return 0
    names = [b.name for b in BENCHMARKS] if args.names == ["all"] else args.names
    try:
        for name in names:
            benchmark(name)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    failures = run(names, args.quick, args.fresh)
    from benchmarks import render_readme

    if args.quick:
        stale = render_readme.main(["--check"])
    else:
        stale = render_readme.main([])
    return 1 if failures or stale else 0


if __name__ == "__main__":
    sys.exit(main())
