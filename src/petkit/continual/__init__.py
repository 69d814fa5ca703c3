"""Continual parameter-efficient tuning: a sequence of tasks, scored for forgetting.

    import petkit as pk
    result = pk.continual("bbc-classes", "hide", output_dir="runs/cl")
    result.matrix, result.metrics   # a[t][i], average accuracy / forgetting / backward transfer

Strategies: sequential, multitask, per-task, o-lora, inflora, hide, conpet (docs/continual.md).
"""

from petkit.continual.metrics import average_accuracy, backward_transfer, forgetting, summarise
from petkit.continual.run import (STRATEGIES, ContinualResult, load_continual, predict,
                                  run_continual)
from petkit.continual.tasks import SEQUENCES, SeqTask, parse_task

__all__ = ["SEQUENCES", "STRATEGIES", "ContinualResult", "SeqTask", "average_accuracy",
           "backward_transfer", "forgetting", "load_continual", "parse_task", "predict",
           "run_continual", "summarise"]
