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

from petkit.core.lazy import lazy_exports

# public name -> the module it lives in; loaded on first use (torch and the models with it)
_EXPORTS = {
    **dict.fromkeys(['BenchReport', 'run', 'write_report'], 'petkit.benchmark.harness'),
    **dict.fromkeys(['ArmSpec', 'BenchSpec', 'Cell', 'TaskSpec', 'load_spec', 'spec_from_dict'], 'petkit.benchmark.spec'),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
