"""Every benchmark that publishes numbers, in the order `python -m benchmarks all` runs them.

To add a benchmark: write ``benchmarks/<name>.py`` whose ``main`` writes
``benchmarks/results/<name>.json`` (and ``.md``) with ``"run": run_record(...)`` (``benchmarks.common``;
``benchmark_main`` does it for task benchmarks), and ``<name>.quick.json`` under ``--quick``; then add
one `Benchmark` line to `BENCHMARKS`. To publish in the README, give the module a function
``readme_sections(data) -> {section: markdown}`` and put ``<!-- results:section -->`` …
``<!-- /results:section -->`` markers in README.md; ``python -m benchmarks.render_readme`` fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS_DIR


@dataclass(frozen=True)
class Benchmark:
    """One results file and the command that writes it.

    ``quick_args`` None: no quick form (the reduced grid would still take the full form's time).
    ``minutes`` / ``quick_minutes``: wall time of the last full / quick run on the project's
    2-core machine (shared with other jobs, load 9-11 for the quick times), for the progress line.
    """

    name: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = ("--quick",)
    minutes: float = 0.0
    quick_minutes: float = 0.0

    def command(self, quick: bool) -> list[str] | None:
        """``python`` arguments of the full or quick form (None: no quick form)."""
        if quick and self.quick_args is None:
            return None
        return ["-m", self.module, *(self.quick_args if quick else self.args)]

    def results(self, quick: bool = False) -> Path:
        return RESULTS_DIR / f"{self.name}{'.quick' if quick else ''}.json"


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("data_aware", "benchmarks.data_aware", ("--resume",), ("--quick", "--resume"), 40, 1.5),
    Benchmark("global_allocation", "benchmarks.global_allocation", (), ("--quick",), 25, 3),
    Benchmark("sparse_residual", "benchmarks.sparse_residual", (), ("--quick",), 15, 5),
    Benchmark("joint", "benchmarks.joint", (), ("--quick",), 20, 10),
    Benchmark("joint_global", "benchmarks.joint",
              ("--global-only", "--output", "benchmarks/results/joint_global"),
              None, 110),
    Benchmark("suite", "benchmarks.suite", (), ("--quick",), 120, 5),
    Benchmark("foundation", "benchmarks.foundation", (), ("--quick",), 25, 3),
    Benchmark("profile_layers", "benchmarks.profile_layers", (), ("--quick",), 10, 3),
    Benchmark("recovery", "benchmarks.recovery", (), ("--quick",), 58, 0.2),
    Benchmark("recovery_width", "benchmarks.recovery",
              ("--kind", "width", "--tasks", "ppocr_rec", "--ppocr-minutes", "8", "--output",
               "benchmarks/results/recovery_width"),
              ("--kind", "width", "--quick", "--output", "benchmarks/results/recovery_width.quick"), 58, 0.2),
    Benchmark("recovery_width_minilm", "benchmarks.recovery",
              ("--kind", "width", "--tasks", "minilm", "--minilm-minutes", "8", "--output",
               "benchmarks/results/recovery_width_minilm"), None, 56),
    Benchmark("recovery_params_minilm", "benchmarks.recovery",
              ("--kind", "params", "--tasks", "minilm", "--minilm-minutes", "3", "--output",
               "benchmarks/results/recovery_params_minilm"), None, 30),
    Benchmark("recovery_blocks", "benchmarks.recovery",
              ("--kind", "blocks", "--tasks", "ppocr_rec", "--ppocr-minutes", "8", "--output",
               "benchmarks/results/recovery_blocks"), None, 31),
    Benchmark("recovery_shards", "benchmarks.recovery_scale",
              ("--study", "shards", "--tasks", "digits_cnn", "ppocr_rec", "--output",
               "benchmarks/results/recovery_shards"),
              ("--study", "shards", "--quick", "--output", "benchmarks/results/recovery_shards.quick"), 20, 0.5),
    Benchmark("recovery_warmup", "benchmarks.recovery_scale",
              ("--study", "warmup", "--tasks", "digits_cnn", "ppocr_rec", "--output",
               "benchmarks/results/recovery_warmup"),
              ("--study", "warmup", "--quick", "--output", "benchmarks/results/recovery_warmup.quick"), 25, 0.5),
    Benchmark("recovery_step", "benchmarks.recovery_scale",
              ("--study", "step", "--tasks", "digits_cnn", "ppocr_rec", "--output",
               "benchmarks/results/recovery_step"),
              ("--study", "step", "--quick", "--output", "benchmarks/results/recovery_step.quick"), 40, 1),
    Benchmark("width", "benchmarks.width", ("--tasks", "ppocr_rec"), ("--quick",), 36, 0.3),
    Benchmark("width_minilm", "benchmarks.width",
              ("--tasks", "minilm", "--output", "benchmarks/results/width_minilm"), None, 30),
    Benchmark("width_det", "benchmarks.width",
              ("--tasks", "ppocr_det", "--output", "benchmarks/results/width_det"), None, 1),
    Benchmark("width_and_rank", "benchmarks.width_and_rank", ("--tasks", "ppocr_rec"), ("--quick",), 45, 3),
    Benchmark("width_and_rank_minilm", "benchmarks.width_and_rank",
              ("--tasks", "minilm", "--output", "benchmarks/results/width_and_rank_minilm"), None, 45),
    Benchmark("width_and_rank_minilm_mild", "benchmarks.width_and_rank",
              ("--tasks", "minilm", "--targets", "1.15", "--output", "benchmarks/results/width_and_rank_minilm_mild"),
              None, 20),
    Benchmark("width_mobile", "benchmarks.width_mobile", (), ("--quick",), 9, 0.5),
    Benchmark("embedding_table", "benchmarks.embedding_table", (), None, 15),
    Benchmark("compressor_cost", "benchmarks.compressor_cost", ("--before", "4145c4a", "--cap", "300", "--layer-cap", "90"),
              ("--quick", "--before", "4145c4a", "--cap", "120"), 40, 1.6),
    Benchmark("scale_out", "benchmarks.scale_out", (), ("--quick", "--models", "synthetic", "--blocks", "2"), 15, 3),
)


def benchmark(name: str) -> Benchmark:
    """The registered benchmark called ``name``."""
    for entry in BENCHMARKS:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(b.name for b in BENCHMARKS)}")
