"""Fair benchmark harness: methods x tasks x seeds x training sizes, side by side with full
fine-tuning and the `peft` package, resumable, with a CSV, Markdown tables and PNG plots.

    import petkit as pk
    report = pk.bench("grid.yaml", "runs/bench")      # petkit.benchmark.harness.run
    print(report.markdown.read_text())

    petkit bench grid.yaml --output runs/bench        # the same from the shell

Fair protocol (Chen et al., 2022, "Revisiting Parameter-Efficient Tuning: Are We Really There
Yet?"): validation is carved from each training subset with the cell's seed and selects the best
step; the test subset is fixed, sealed (`petkit.data.RecordedSplit`) and read once, after
training; every arm sees the same data and seeds. See `spec.py` for the YAML format.
"""

from petkit.benchmark.harness import BenchReport, run, write_report
from petkit.benchmark.spec import ArmSpec, BenchSpec, Cell, TaskSpec, load_spec, spec_from_dict

__all__ = ["ArmSpec", "BenchReport", "BenchSpec", "Cell", "TaskSpec", "load_spec", "run",
           "spec_from_dict", "write_report"]
