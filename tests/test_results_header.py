"""The results-page header the width benchmarks share (`benchmarks.common.results_header`)."""
from benchmarks import width, width_and_rank, width_mobile
from benchmarks.common import results_header

MACHINE = {"date": "2026-12-05T08:21:44+00:00", "cpu": "Xeon", "onnxruntime": "1.32.0",
           "load_average_at_start": [9.75, 9.13, 8.14], "git_commit": "b6af975 (with uncommitted changes)"}


def test_the_header_names_command_commit_machine_and_load_from_the_run_record():
    run = {"command": "python -m benchmarks.width_mobile --quick", "commit": "abc123", "dirty": True,
           "diff_sha1": "9fa149e34c0000", "started": "2026-12-05T08:21:44+00:00"}
    lines = results_header({"run": run, "machine": MACHINE, "argv": ["--quick"], "total_s": 24.0}, "Title",
                           "benchmarks.width_mobile")
    assert lines[0] == "# Title" and lines[-1] == ""
    assert lines[2] == ("`python -m benchmarks.width_mobile --quick` — 2026-12-05T08:21:44+00:00, onnx_lrsd commit "
                        "abc123 with uncommitted changes (diff 9fa149e34c), Xeon, onnxruntime 1.32.0; total 0.4 min. "
                        "Machine shared with other jobs (load average at start [9.75, 9.13, 8.14]): latency as "
                        "interleaved ratios to the original (2 threads, block medians; below 1 is faster). See the "
                        "module docstring for what each row is.")


def test_a_file_from_before_run_records_keeps_its_machine_record():
    line = results_header({"machine": MACHINE, "argv": []}, "T", "benchmarks.width")[2]
    assert line.startswith("`python -m benchmarks.width` — 2026-12-05T08:21:44+00:00, onnx_lrsd commit b6af975 "
                           "(with uncommitted changes), Xeon")


def test_every_width_page_starts_with_it():
    data = {"machine": MACHINE, "argv": [], "tasks": []}
    for module, title in ((width, "Structured width reduction"), (width_and_rank, "Low rank, width, and both"),
                          (width_mobile, "Width reduction on a mobile net")):
        text = module.render(data)
        assert text.startswith(f"# {title}") and "load average at start [9.75, 9.13, 8.14]" in text
