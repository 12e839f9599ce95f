"""The README's measured tables are what `benchmarks.render_readme` renders from the results files:
a number typed into the README, or a results file changed without re-rendering, fails here."""
import json
from pathlib import Path

import pytest

from benchmarks import render_readme
from benchmarks.registry import BENCHMARKS


def test_readme_sections_match_the_results_files():
    readme = render_readme.README.read_text()
    sections = render_readme.rendered_sections()
    assert render_readme.MARKER.search(readme), "the README has no rendered sections"
    stale = render_readme.differing(readme, sections)
    assert not stale, f"README sections differ from the results: {stale}; run `python -m benchmarks.render_readme`"
    assert render_readme.render(readme, sections) == readme


def test_every_section_names_its_commit_and_command():
    for name, text in render_readme.rendered_sections().items():
        first = text.splitlines()[0]
        assert first.startswith("*Measured at commit `") and "by `python -m benchmarks." in first, (name, first)


def test_a_changed_number_is_detected():
    readme = render_readme.README.read_text()
    sections = render_readme.rendered_sections()
    name, text = next((n, t) for n, t in sections.items() if "| 0." in t)
    tampered = readme.replace(text, text.replace("| 0.", "| 1.", 1), 1)
    assert render_readme.differing(tampered, sections) == [name]
    assert render_readme.render(tampered, sections) == render_readme.render(readme, sections)


def test_a_marker_nothing_renders_is_an_error():
    with pytest.raises(SystemExit, match="no benchmark renders: nowhere"):
        render_readme.render("<!-- results:nowhere -->\n<!-- /results:nowhere -->\n", {})


def test_results_files_record_their_run():
    """Results written since run records exist say the commit, dirty flag, machine, times and command."""
    for entry in BENCHMARKS:
        path = entry.results()
        if not path.is_file():
            continue
        run = json.loads(path.read_text()).get("run")
        if run is None:  # older than run records: the README line says so
            continue
        assert {"command", "commit", "dirty", "started", "finished", "machine"} <= set(run), path
        assert {"cpu", "cores_logical", "onnxruntime", "onnx", "numpy"} <= set(run["machine"]), path
        assert run["command"].startswith("python -m benchmarks."), path


def test_a_results_file_from_before_run_records_keeps_what_it_recorded():
    """A dirty tree recorded in the old machine record is said; a script command is named as the module."""
    dirty = {"machine": {"git_commit": "2f4c45a5f81bf09070a97369c9a3fdcd32023d79 (with uncommitted changes)",
                         "date": "2026-12-05T06:04:55+00:00"}, "argv": ["--tasks", "ppocr_det"]}
    line = render_readme.provenance(dirty, "benchmarks.width")
    assert "`2f4c45a5f8` on 2026-12-05 by `python -m benchmarks.width --tasks ppocr_det` with uncommitted" in line
    assert "no dirty-tree flag" not in line
    script = {"machine": {"git_commit": "3fa5561c58ee069cadf82356cccf1192a9cfb1fb", "date": "2026-12-05T05:10:33"},
              "command": "python benchmarks/compressor_cost.py --before x --cap 300"}
    line = render_readme.provenance(script, "benchmarks.compressor_cost")
    assert "by `python -m benchmarks.compressor_cost --before x --cap 300` (a results file from before run" in line
