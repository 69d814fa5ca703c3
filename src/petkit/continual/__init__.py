"""Continual parameter-efficient tuning: a sequence of tasks, scored for forgetting.

    import petkit as pk
    result = pk.continual("bbc-classes", "hide", output_dir="runs/cl")
    result.matrix, result.metrics   # a[t][i], average accuracy / forgetting / backward transfer

Strategies: sequential, multitask, per-task, o-lora, inflora, hide, conpet (docs/continual.md).
"""

import sys
import types

from petkit.core.lazy import lazy_exports

# public name -> the module it lives in; loaded on first use (torch and the models with it)
_EXPORTS = {
    **dict.fromkeys(['average_accuracy', 'backward_transfer', 'forgetting', 'summarise'], 'petkit.continual.metrics'),
    **dict.fromkeys(['STRATEGIES', 'ContinualResult', 'load_continual', 'predict', 'run_continual'], 'petkit.continual.run'),
    **dict.fromkeys(['SEQUENCES', 'SeqTask', 'parse_task'], 'petkit.continual.tasks'),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _CallablePackage(types.ModuleType):
    """`pk.continual(...)` is `run_continual` also after `import petkit.continual.<module>`
    (the import system then sets the facade's `continual` attribute to this package)."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.run_continual(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
