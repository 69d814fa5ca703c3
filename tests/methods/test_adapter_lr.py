"""Per-adapter learning rates (`BackpropConfig.adapter_lr`): with several adapters active and
trained together (a stack, e.g. (IA)3 with a LoRA delta), each named adapter's parameters form
their own optimiser group at its rate; the rest train at `lr`. Exact first-step sizes, the
layout beside LoRA+ and head_lr, the checks, resume across layouts, and `pk.train` end to end."""
import pytest
import torch

import petkit as pk
from petkit.training import TrainConfig, train
from petkit.training.steppers.backprop import BackpropConfig, BackpropStepper
from toys import inputs, llama, run


def stacked(**lora):
    """The tiny Llama with (IA)3 ("ia3") and LoRA r 2 ("lora") attached, both active."""
    m = llama()
    pk.attach(m, pk.IA3Config(), name="ia3")
    pk.attach(m, pk.LoraConfig(r=2, **lora), name="lora")
    return pk.activate(m, ["ia3", "lora"])


def stepper_for(model, lr=1e-3, **own):
    params = pk.trainable_parameters(model)
    head_lr = own.pop("head_lr", None)
    config = TrainConfig(lr=lr, head_lr=head_lr, stepper=BackpropConfig(**own))
    stepper = BackpropStepper(params, config, total_steps=10)
    stepper.bind_model(model)
    return params, stepper


def first_step(model, params, stepper):
    """{name: largest change of the tensor} after one AdamW step (each entry moves by its lr)."""
    before = {n: p.detach().clone() for n, p in params.items()}
    stepper.step([inputs("llama")], lambda x: run(model, x).pow(2).mean())
    return {n: float((p.detach() - before[n]).abs().max()) for n, p in params.items()}


def test_each_named_adapter_trains_at_its_rate_the_rest_at_lr():
    m = stacked()
    params, stepper = stepper_for(m, adapter_lr={"ia3": 1e-2})
    groups = stepper.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    ia3 = {n for n in params if n.endswith("ia3_l")}
    assert {id(p) for p in groups[1]["params"]} == {id(params[n]) for n in ia3} and len(ia3) == 6
    moved = first_step(m, params, stepper)
    assert all(moved[n] == pytest.approx(1e-2, rel=2e-2) for n in ia3)
    assert all(moved[n] == pytest.approx(1e-3, rel=1e-3) for n in params if n.endswith("lora_B"))
    assert stepper.current_lr() == pytest.approx(1e-3 * stepper.factor(1))


def test_every_adapter_named_leaves_the_first_group_empty_and_lr_still_schedules():
    m = stacked()
    params, stepper = stepper_for(m, adapter_lr="ia3=1e-2, lora=5e-4")
    assert [g["lr"] for g in stepper.optimizer.param_groups] == [1e-3, 1e-2, 5e-4]
    assert stepper.optimizer.param_groups[0]["params"] == []
    moved = first_step(m, params, stepper)
    assert all(v == pytest.approx(5e-4, rel=1e-3) for n, v in moved.items() if n.endswith("lora_B"))


def test_beside_loraplus_and_head_lr():
    """An adapter's B factors train at its rate * ratio; the full trainable copies at head_lr."""
    m = llama()
    pk.attach(m, pk.IA3Config(modules_to_save=["lm_head"]), name="ia3")
    pk.attach(m, pk.LoraConfig(r=2), name="lora")
    pk.activate(m, ["ia3", "lora"])
    params, stepper = stepper_for(m, adapter_lr={"lora": 2e-3}, loraplus_ratio=4.0, head_lr=5e-3)
    layout = [(len(g["params"]), g["lr"]) for g in stepper.optimizer.param_groups]
    # ia3's vectors at lr; lora's A at 2e-3, its B at 8e-3; the head copy at head_lr
    assert layout == [(6, 1e-3), (4, 2e-3), (4, pytest.approx(8e-3)), (1, 5e-3)]


@pytest.mark.parametrize("value, normal", [
    ({"ia3": 0.01}, ("ia3=0.01",)),
    ("ia3=1e-2,lora=2e-3", ("ia3=0.01", "lora=0.002")),
    (["ia3=1e-2"], ("ia3=0.01",)),
    ([["ia3", "1e-2"]], ("ia3=0.01",)),  # a mapping after a JSON round trip of its pairs
    ((), ()),
])
def test_the_setting_reads_a_mapping_or_name_equals_rate_texts(value, normal):
    config = BackpropConfig(adapter_lr=value)
    assert config.adapter_lr == normal
    assert BackpropConfig.from_dict(config.to_dict()) == config
    assert ("adapter_lr" in config.to_dict()) == bool(normal)  # unset: runs read as before


@pytest.mark.parametrize("value", [{"ia3": 0}, {"ia3": -1e-3}, {"ia3": 11}, {"ia3": float("nan")},
                                   {"ia3": True}, {"ia3": "fast"}, {"": 1e-3}, "ia3", ["a=1e-3", "a=2e-3"],
                                   7])
def test_bad_settings_raise_naming_the_field(value):
    with pytest.raises(pk.ConfigError, match=r"stepper\.adapter_lr"):
        BackpropConfig(adapter_lr=value)


def test_a_name_that_is_no_adapter_or_not_trained_raises():
    m = stacked()
    with pytest.raises(pk.ConfigError, match=r"\['lorra'\].*the model's adapters: \['ia3', 'lora'\]"):
        stepper_for(m, adapter_lr={"lorra": 1e-2})
    pk.activate(m, "lora")  # ia3 attached but not trained
    with pytest.raises(pk.ConfigError, match=r"\['ia3'\], whose parameters are not trained"):
        stepper_for(m, adapter_lr={"ia3": 1e-2})
    params = pk.trainable_parameters(m)
    unbound = BackpropStepper(params, TrainConfig(stepper=BackpropConfig(adapter_lr={"lora": 1e-2})), 10)
    with pytest.raises(pk.ConfigError, match="adapter_lr need the model"):
        unbound.step([inputs("llama")], lambda x: run(m, x).pow(2).mean())


def test_resume_regroups_adam_state_by_name_across_layouts():
    """A checkpoint written with adapter_lr, read by a stepper without it (and back): each
    parameter keeps its own moments; the state names its groups' parameters."""
    m = stacked()
    params, with_rates = stepper_for(m, adapter_lr={"ia3": 1e-2})
    first_step(m, params, with_rates)
    state = with_rates.state_dict()
    assert [len(g) for g in state["groups"]] == [8, 6]
    _, plain = stepper_for(m)
    plain.load_state_dict(state)
    names = list(params)
    saved = {n: state["optimizer"]["state"][i] for i, n in enumerate(state["groups"][0] + state["groups"][1])}
    loaded = plain.optimizer.state_dict()["state"]
    for i, n in enumerate(names):  # the plain layout: one group in parameter order
        assert torch.equal(loaded[i]["exp_avg"], saved[n]["exp_avg"]), n
    assert [g["lr"] for g in plain.optimizer.param_groups] == [pytest.approx(1e-3 * plain.factor(1))]
    _, again = stepper_for(m, adapter_lr={"ia3": 1e-2})
    again.load_state_dict(plain.state_dict())
    assert [len(g["params"]) for g in again.optimizer.param_groups] == [8, 6]


def test_pk_train_takes_it_from_the_train_config(tmp_path):
    m = stacked()
    params = pk.trainable_parameters(m)
    before = {n: p.detach().clone() for n, p in params.items()}
    data = [{"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([1, 2, 3, 4])}] * 4
    config = TrainConfig.from_dict({"max_steps": 1, "batch_size": 4, "lr": 1e-3, "progress": False,
                                    "warmup_steps": 0, "stepper": {"name": "backprop", "adapter_lr": {"ia3": 1e-2}}})
    train(m, data, config)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in params.items()}
    assert max(v for n, v in moved.items() if "ia3" in n) == pytest.approx(1e-2, rel=2e-2)
    assert max(v for n, v in moved.items() if "lora_B" in n) == pytest.approx(1e-3, rel=2e-2)


def test_the_command_line_spelling_reads_as_the_yaml_one():
    from petkit.app.recipe import Recipe, apply_overrides

    recipe = apply_overrides(Recipe(), {"train.stepper.adapter_lr": "ia3=1e-2,lora=5e-4"})
    assert recipe.train.stepper.adapter_rates() == {"ia3": 1e-2, "lora": 5e-4}
    recipe = apply_overrides(Recipe(), {"train.stepper.adapter_lr": "{ia3: 1.0e-2}"})
    assert recipe.train.stepper.adapter_rates() == {"ia3": 1e-2}


def test_parameters_are_found_by_identity_under_a_wrapper():
    """A wrapped model (as DDP wraps it: `module.` before every name) still finds its adapters."""
    m = stacked()
    params = pk.trainable_parameters(m)
    wrapper = torch.nn.Module()
    wrapper.module = m
    config = TrainConfig(lr=1e-3, stepper=BackpropConfig(adapter_lr={"ia3": 1e-2}))
    stepper = BackpropStepper(params, config, total_steps=10)
    stepper.bind_model(wrapper)  # its names differ from params' keys; it holds no adapter records
    assert {n for n, a in stepper.owner.items() if a == "ia3"} == {n for n in params if n.endswith("ia3_l")}
    assert [len(g["params"]) for g in stepper.optimizer.param_groups] == [8, 6]
    with pytest.raises(pk.ConfigError, match=r"the model's adapters: \['ia3', 'lora'\]"):
        BackpropStepper(params, TrainConfig(stepper=BackpropConfig(adapter_lr={"x": 1e-2})), 10).bind_model(wrapper)
