"""Training: one loop (`train`), pluggable steppers, objectives, checkpoints, evaluation."""

from petkit.training.checkpoint import latest_checkpoint
from petkit.training.config import TrainConfig
from petkit.training.evaluate import evaluate
from petkit.training.loop import TrainResult, train
from petkit.training.objectives import ModelLoss, Objective, Verbaliser, make_objective
from petkit.training.steppers import (Stepper, StepperConfig, list_steppers, make_stepper,
                                      register_stepper)
from petkit.training.steppers.ist import IstConfig
from petkit.training.steppers.backprop import BackpropStepper
from petkit.training.steppers.cma_es import CmaStepper
from petkit.training.steppers.zeroth import ZOSettings, ZOStepper, replay_mezo

__all__ = ["BackpropStepper", "CmaStepper", "ModelLoss", "Objective", "IstConfig", "Stepper", "StepperConfig", "TrainConfig",
           "TrainResult", "Verbaliser", "ZOSettings", "ZOStepper", "evaluate", "latest_checkpoint",
           "list_steppers", "make_objective", "make_stepper", "register_stepper", "replay_mezo",
           "train"]
