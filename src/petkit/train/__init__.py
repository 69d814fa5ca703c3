"""Training: one loop (`train`), pluggable steppers, objectives, checkpoints, evaluation."""

from petkit.train.checkpoint import latest_checkpoint
from petkit.train.config import TrainConfig
from petkit.train.evaluate import evaluate
from petkit.train.loop import TrainResult, train
from petkit.train.objectives import ModelLoss, Objective, Verbaliser, make_objective
from petkit.train.steppers import Stepper, list_steppers, make_stepper, register_stepper
from petkit.train.steppers.backprop import BackpropStepper
from petkit.train.steppers.cma_es import CmaStepper
from petkit.train.steppers.zeroth import ZOSettings, ZOStepper, replay_mezo

__all__ = ["BackpropStepper", "CmaStepper", "ModelLoss", "Objective", "Stepper", "TrainConfig",
           "TrainResult", "Verbaliser", "ZOSettings", "ZOStepper", "evaluate", "latest_checkpoint",
           "list_steppers", "make_objective", "make_stepper", "register_stepper", "replay_mezo",
           "train"]
