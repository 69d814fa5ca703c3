"""AdaLoRA: h = W0 x + alpha/r P (Λ ⊙ Q x); the budget schedule prunes Λ across layers."""
import torch

import petkit as pk
from petkit.methods.adalora import RankAllocator
from petkit.training.step_hooks import StepHooks
from toys import mlp, perturb


def test_forward_is_the_svd_form():
    m = mlp()
    w0, b0 = m.fc2.weight.detach().clone(), m.fc2.bias
    pk.attach(m, pk.AdaLoraConfig(init_r=3, target_r=1, alpha=6.0, targets=["fc2"]))
    perturb(pk.trainable_parameters(m), scale=0.5)
    w = m.fc2
    dw = w.lora_B @ (w.lora_A * w.lora_E) * (6.0 / (3 + 1e-5))
    x = torch.randn(2, 16)
    torch.testing.assert_close(w(x), (x @ (w0 + dw).T).detach())
    assert b0 is None


def test_budget_schedule_is_cubic_between_tinit_and_tfinal():
    cfg = pk.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=10, delta_t=5)
    alloc = RankAllocator(cfg)
    alloc.layers = [object()] * 2  # 2 layers: budget 24 -> 8
    assert alloc.schedule(10, 100) == (24, False)
    assert alloc.schedule(50, 100) == (int(16 * 0.5 ** 3 + 8), True)
    assert alloc.schedule(51, 100)[1] is False
    assert alloc.schedule(95, 100) == (8, True)


def test_training_with_the_step_hooks_keeps_the_budget_across_layers():
    torch.manual_seed(0)
    m = mlp()
    pk.attach(m, pk.AdaLoraConfig(init_r=4, target_r=2, targets=["fc1", "fc2"]))
    params = pk.trainable_parameters(m)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    hooks, x = StepHooks(m), torch.randn(16, 8)
    hooks.on_step(0, 6)
    for step in range(1, 7):
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # as the backprop stepper does, before the step hooks
        hooks.on_step(step, 6)
    kept = [int((w.lora_E != 0).sum()) for w in (m.fc1, m.fc2)]
    assert sum(kept) == 2 * 2  # the final budget: target_r x layers, wherever the scores put it
    assert hooks.metrics()["adalora_rank"] == sum(kept) / 2


def test_pk_train_prunes_to_the_final_budget():
    """Through the real loop (whose stepper clears gradients before the step hooks run)."""
    from test_train import run as train_run, separable
    from toys import llama

    m = llama()
    pk.attach(m, pk.AdaLoraConfig(init_r=4, target_r=1, targets=["q_proj", "v_proj"]))
    train_run(m, separable(16), max_steps=4, grad_accum=2, batch_size=4)
    kept = sum(int((w.lora_E != 0).sum()) for _, w in pk.core.delta.iter_deltas(m))
    assert kept == 1 * 4  # target_r x 4 layers
