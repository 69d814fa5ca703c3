"""LoRA+ (Hayou et al., 2024): the backprop stepper trains low-rank B factors at lr * ratio."""
import pytest
import torch

import petkit as pk
from petkit.training import TrainConfig
from petkit.training.steppers.backprop import BackpropConfig, BackpropStepper
from toys import inputs, llama, run


def stepper_for(model, **cfg):
    params = pk.trainable_parameters(model)
    config = TrainConfig(lr=1e-3, stepper=BackpropConfig(loraplus_ratio=16.0), **cfg)
    stepper = BackpropStepper(params, config, total_steps=10)
    stepper.bind_model(model)
    return params, stepper


def test_b_factors_get_their_own_group_at_lr_times_ratio():
    m = pk.attach(llama(), pk.LoraConfig(r=2))
    params, stepper = stepper_for(m)
    groups = stepper.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(16e-3)]
    b = {id(p) for n, p in params.items() if n.endswith("lora_B")}
    assert {id(p) for p in groups[1]["params"]} == b and len(b) == 4
    assert not b & {id(p) for p in groups[0]["params"]}
    batch = inputs("llama")  # AdamW's first step moves each entry by its lr (the sign of its gradient)
    before = {n: p.detach().clone() for n, p in params.items()}
    stepper.step([batch], lambda x: run(m, x).pow(2).mean())
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in params.items()}
    assert all(v == pytest.approx(16e-3, rel=1e-3) for n, v in moved.items() if n.endswith("lora_B"))
    assert all(v <= 1e-3 * 1.001 for n, v in moved.items() if n.endswith("lora_A"))  # B = 0: A's gradient is 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_with_a_frozen_offset_still_puts_b_in_the_ratio_group(init):
    m = pk.attach(llama(), pk.LoraConfig(r=2, init=init))
    params, stepper = stepper_for(m)
    b = {id(p) for n, p in params.items() if n.endswith("lora_B")}
    assert len(b) == 4 and {id(p) for p in stepper.optimizer.param_groups[1]["params"]} == b


def test_with_head_lr_three_groups_and_bad_ratio_raises():
    m = pk.attach(llama(), pk.LoraConfig(r=2, modules_to_save=["lm_head"]))
    _, stepper = stepper_for(m, head_lr=5e-3)
    assert [g["lr"] for g in stepper.optimizer.param_groups] == [1e-3, pytest.approx(16e-3), 5e-3]
    with pytest.raises(pk.ConfigError, match="loraplus_ratio"):
        BackpropConfig(loraplus_ratio=0)


def test_a_method_without_b_factors_warns():
    m = pk.attach(llama(), pk.IA3Config())
    with pytest.warns(UserWarning, match="loraplus_ratio=16.0 has no effect"):
        _, stepper = stepper_for(m)
    assert len(stepper.optimizer.param_groups) == 1
