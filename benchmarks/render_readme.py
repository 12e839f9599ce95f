"""Render the README's measured tables from the results files.

    python -m benchmarks.render_readme            # rewrite README.md between the markers
    python -m benchmarks.render_readme --check    # exit 1 (and name the sections) if README.md differs

README.md holds ``<!-- results:SECTION -->`` … ``<!-- /results:SECTION -->`` pairs. Every
benchmark of ``benchmarks/registry.py`` whose module defines ``readme_sections(data)`` renders its
sections from its full results file (``benchmarks/results/<name>.json``; quick results are never
published); each section starts with the line naming the commit, date and command it was measured
with. A marker no benchmark renders, or a section whose results file is missing, is an error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT
from benchmarks.registry import BENCHMARKS

README: Path = REPO_ROOT / "README.md"
MARKER = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def _measured(run: dict[str, Any]) -> str:
    commit = (run.get("commit") or "unknown")[:10]
    state = " with uncommitted changes" if run.get("dirty") else ""
    return f"commit `{commit}`{state} on {run['started'][:10]} by `{run['command']}`"


def provenance(data: dict[str, Any], module: str) -> str:
    """One line: the commit (and a dirty tree), the date and the command of a results file, and of
    each later run that re-measured some of its parts (``partial_runs``)."""
    later = "".join(f"; parts {', '.join(map(str, p['parts']))} re-measured at {_measured(p['run'])}"
                    for p in data.get("partial_runs", []) if p.get("run"))
    run = data.get("run")
    if run:
        return f"*Measured at {_measured(run)}{later}, on a 2-core machine shared with other jobs.*"
    machine = data.get("machine") or data.get("environment") or {}
    recorded = machine.get("git_commit") or "unknown"
    commit = recorded.split()[0][:10]
    dirty = ("with uncommitted changes (a results file from before run records: no hash of the diff)"
             if "uncommitted changes" in recorded else "(a results file from before run records: no dirty-tree flag)")
    return (f"*Measured at commit `{commit}` on {(machine.get('date') or '')[:10]} by `{_old_command(data, module)}` "
            f"{dirty}{later}, on a 2-core machine shared with other jobs.*")


def _old_command(data: dict[str, Any], module: str) -> str:
    """The command a results file from before run records names: its ``argv`` after
    ``python -m module``, or its ``command`` (``python benchmarks/x.py ARGS`` written as the
    equivalent ``python -m benchmarks.x ARGS``)."""
    script = "python " + module.replace(".", "/") + ".py"
    command = data.get("command")
    if isinstance(command, str) and (command == script or command.startswith(script + " ")):
        return f"python -m {module}" + command[len(script):]
    if isinstance(command, str) and command.startswith(f"python -m {module}"):
        return command
    args = " ".join(data.get("argv") or [])
    return f"python -m {module}" + (f" {args}" if args else "")


def rendered_sections() -> dict[str, str]:
    """Every README section the registered benchmarks render from their full results files."""
    sections: dict[str, str] = {}
    for entry in BENCHMARKS:
        module = importlib.import_module(entry.module)
        if not hasattr(module, "readme_sections"):
            continue
        path = entry.results(quick=False)
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python -m benchmarks {entry.name}`")
        data = json.loads(path.read_text())
        line = provenance(data, entry.module)
        for name, text in module.readme_sections(data).items():
            sections[name] = f"{line}\n\n{text.strip()}\n"
    return sections


def render(readme: str, sections: dict[str, str]) -> str:
    """``readme`` with every marked section replaced by its rendering."""
    unknown = sorted({m.group(2) for m in MARKER.finditer(readme)} - set(sections))
    if unknown:
        raise SystemExit(f"README sections no benchmark renders: {', '.join(unknown)}")
    return MARKER.sub(lambda m: m.group(1) + sections[m.group(2)] + m.group(4), readme)


def differing(readme: str, sections: dict[str, str]) -> list[str]:
    """Names of the README's sections whose text is not what the results render."""
    return [m.group(2) for m in MARKER.finditer(readme) if m.group(3) != sections.get(m.group(2))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report sections that differ (exit 1)")
    args = parser.parse_args(argv)
    readme = README.read_text()
    sections = rendered_sections()
    if args.check:
        stale = differing(readme, sections)
        if stale:
            print(f"README.md differs from the results in: {', '.join(stale)} "
                  "(python -m benchmarks.render_readme)", file=sys.stderr)
        return 1 if stale else 0
    text = render(readme, sections)
    if text != readme:
        README.write_text(text)
    print(f"README.md: {len(list(MARKER.finditer(text)))} sections rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
