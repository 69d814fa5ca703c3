"""petkit's fused low-rank delta (`training.fused_delta`): the function's numerics against the
eager expression, the dispatch (which layers take it, which fall back and why), the model left
as it was, torch.compile, saving and loading, and `pk.train` with `--runtime.kernels=fused`.
The `gpu` tests repeat the numerics in bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petkit as pk
from petkit.core.delta import iter_deltas
from petkit.training import fused_delta
from petkit.training.fused_delta import FusedLowRank, fused_deltas
from toys import llama

CPU = ("cpu",)


def _eager(x, w, a, b, scale):
    return F.linear(x, w) + scale * F.linear(F.linear(x, a), b)


def _grads(fn, x, w, a, b, scale):
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y = fn(x, w, a, b, scale)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


def _fused(x, w, a, b, scale, one_gemm=True):
    return FusedLowRank.apply(x, torch.cat([w, a.detach().to(w.dtype)]), a, b, scale, one_gemm)


def _fused2(x, w, a, b, scale):
    return _fused(x, w, a, b, scale, one_gemm=False)


# the three ways to the input gradient: merged weight (many tokens), dy beside g, two passes
@pytest.mark.parametrize("tokens,out_f,in_f", [(64, 12, 20), (5, 12, 20), (5, 20, 12)])
def test_fused_function_equals_the_eager_expression_and_its_gradients(tokens, out_f,
                                                                      in_f) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, tokens, in_f, generator=gen, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    a = torch.randn(4, in_f, generator=gen, dtype=torch.float64)
    b = torch.randn(out_f, 4, generator=gen, dtype=torch.float64)
    want = _grads(_eager, x, w, a, b, 0.7)
    for fused in (_fused, _fused2):  # one GEMM over [W; A], or two
        for ref, out in zip(want, _grads(fused, x, w, a, b, 0.7)):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b_scale", [0.25, 1e-3])  # a delta near W's size, and one below its ulp
@pytest.mark.parametrize("tokens,out_f,in_f", [(512, 128, 256), (32, 128, 256), (32, 256, 128)])
def test_fused_function_in_bf16_is_as_close_to_fp64_as_the_eager_path(tokens, out_f, in_f,
                                                                      b_scale) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, in_f, generator=gen).bfloat16()
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).bfloat16()
    a = torch.randn(16, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, 16, generator=gen) * b_scale
    exact = _grads(_eager, x.double(), w.double(), a.double(), b.double(), 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [_grads(fn, x, w, a, b, 2.0) for fn in (_eager, _fused, _fused2)]
    for ref, *outs in zip(exact, *runs):  # y, dx, dA, dB
        scale = float(ref.abs().max())
        eager, *fused = [float((t.double() - ref).abs().max()) / scale for t in outs]
        assert max(fused) <= 1.25 * eager + 1e-3, (eager, fused)


def test_fused_function_skips_the_input_gradient_when_the_input_needs_none() -> None:
    w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2)
    b.requires_grad_(True)
    x = torch.randn(4, 8)  # no grad: the first block's input under a frozen embedding
    FusedLowRank.apply(x, torch.cat([w, a.detach()]), a, b, 2.0).sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None


def _lora_llama(seed: int = 0, **lora: object) -> torch.nn.Module:
    model = llama()
    torch.manual_seed(seed)
    pk.attach(model, pk.LoraConfig(**{"r": 4, "targets": "all-linear", **lora}))
    with torch.no_grad():  # B != 0, so the delta's gradients reach A and the input
        for param in pk.trainable_parameters(model).values():
            param.normal_(0, 0.2)
    return model.train()


def _loss_and_grads(model, ids, bf16=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in pk.trainable_parameters(model).items()}


def _check_same(model, dtype, tol) -> None:
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    bf16 = dtype == torch.bfloat16
    loss0, grads0 = _loss_and_grads(model, ids, bf16)
    with fused_deltas(model, dtype, CPU) as report:
        assert report.fused == 14 and not report.skipped
        loss1, grads1 = _loss_and_grads(model, ids, bf16)
    torch.testing.assert_close(loss1, loss0, rtol=tol, atol=tol)
    for key, grad in grads0.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads1[key], grad, rtol=0, atol=tol * max(scale, 1e-6))


@pytest.mark.parametrize("one_gemm", [True, False])
def test_a_tiny_llama_gives_the_same_loss_and_gradients_fused_fp32(one_gemm, monkeypatch) -> None:
    monkeypatch.setattr(fused_delta, "ONE_GEMM_FORWARD", one_gemm)
    _check_same(_lora_llama(), torch.float32, 1e-5)


def test_a_tiny_llama_gives_the_same_loss_and_gradients_fused_bf16_weights() -> None:
    model = _lora_llama()
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    _check_same(model, torch.bfloat16, 3e-2)


@pytest.mark.parametrize("mode", ["selective", "elementwise"])
@pytest.mark.parametrize("one_gemm", [True, False])
def test_recompute_policies_that_keep_matmul_outputs_see_the_same_values(one_gemm, mode,
                                                                        monkeypatch) -> None:
    """A policy caches some matmul outputs for the recompute: none may be changed in place."""
    from petkit.training.activations import activation_checkpointing

    monkeypatch.setattr(fused_delta, "ONE_GEMM_FORWARD", one_gemm)
    model = _lora_llama()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    with fused_deltas(model, torch.float32, CPU), activation_checkpointing(model, 1, mode):
        loss1, grads1 = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=1e-4, atol=1e-6)


def test_a_bias_delta_and_a_biased_base_take_the_fused_path() -> None:
    model = pk.attach(torch.nn.Sequential(torch.nn.Linear(8, 6)),
                      pk.LoraConfig(r=2, targets=["0"], bias="lora_only"))
    with torch.no_grad():
        for param in pk.trainable_parameters(model).values():
            param.normal_()
    x = torch.randn(5, 8)
    want = model(x)
    with fused_deltas(model, torch.float32, CPU) as report:
        assert report.fused == 1
        torch.testing.assert_close(model(x), want)


def test_dispatch_says_why_a_layer_keeps_the_eager_path() -> None:
    model = _lora_llama(dropout=0.1)  # dropout active in training mode
    with fused_deltas(model, torch.float32, CPU) as report:
        assert report.fused == 0 and report.skipped == {"method, dropout or init": 14}
    assert "eager: 14 method, dropout or init" in report.note()
    with fused_deltas(_lora_llama(), torch.float32, ("cuda",)) as report:  # weights on the CPU
        assert report.skipped == {"weight on cpu": 14}
    with fused_deltas(_lora_llama(), torch.bfloat16, CPU) as report:  # fp32 weights, bf16 compute
        assert report.fused == 0 and "compute dtype torch.bfloat16" in next(iter(report.skipped))
    dora = llama()
    pk.attach(dora, pk.make_config("dora", r=4, targets="all-linear"))
    with fused_deltas(dora, torch.float32, CPU) as report:
        assert report.fused == 0


def test_dropout_in_eval_mode_takes_the_fused_path() -> None:
    model = _lora_llama(dropout=0.1).eval()
    ids = torch.randint(3, 100, (1, 8))
    want = model(input_ids=ids).logits
    with fused_deltas(model, torch.float32, CPU) as report:
        assert report.fused == 14
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_disabled_and_merged_adapters_run_their_own_forward_while_installed() -> None:
    model = _lora_llama().eval()
    ids = torch.randint(3, 100, (1, 8))
    with pk.disabled(model):
        base = model(input_ids=ids).logits
    with fused_deltas(model, torch.float32, CPU):
        with pk.disabled(model):
            assert torch.equal(model(input_ids=ids).logits, base)
        adapted = model(input_ids=ids).logits
        pk.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
        pk.unmerge(model)


def test_two_forwards_then_one_backward(monkeypatch) -> None:
    """A preference objective runs the model twice before the backward: the first forward's saved
    [W; A] must not change in between."""
    model = _lora_llama()
    ids = torch.randint(3, 100, (2, 8))

    def two() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss + 2 * model(input_ids=ids[:, :6],
                                                                labels=ids[:, :6]).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in pk.trainable_parameters(model).items()}

    loss0, grads0 = two()
    with fused_deltas(model, torch.float32, CPU):
        loss1, grads1 = two()
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=0, atol=1e-4 * float(grad.abs().max()))


def test_the_model_is_as_before_after_the_context() -> None:
    model = _lora_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fused_deltas(model, torch.float32, CPU):
        pass
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for _, wrapper in iter_deltas(model):
        assert "forward" not in vars(wrapper)
        weight = wrapper.base.weight
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32 A into a bf16 [W; A]
def test_optimiser_updates_of_a_reach_the_fused_forward(dtype) -> None:
    model = _lora_llama().eval()
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    ids = torch.randint(3, 100, (1, 8))
    with fused_deltas(model, dtype, CPU):
        with torch.no_grad():
            for _, wrapper in iter_deltas(model):
                wrapper.lora_A.add_(0.5)  # as an optimiser step does, in place
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fused = model(input_ids=ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        eager = model(input_ids=ids).logits
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(eager.detach().abs().max())
    torch.testing.assert_close(fused, eager, rtol=0, atol=tol)


@pytest.mark.parametrize("fused_adamw", [True, False])
def test_a_fused_adamw_step_reaches_the_fused_forward(fused_adamw: bool) -> None:
    """torch's fused AdamW updates A in place without bumping its version counter (checked
    here): the refresh must follow optimiser steps, not versions alone (on a GPU the [W; A] copy
    went stale, and training lost A's updates)."""
    model = _lora_llama().eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.5, fused=fused_adamw, foreach=not fused_adamw)
    ids = torch.randint(3, 100, (1, 8))
    with fused_deltas(model, torch.float32, CPU):
        model(input_ids=ids).logits.sum().backward()
        versions = [p._version for p in trained]
        optimizer.step()
        assert fused_adamw == all(p._version == v for p, v in zip(trained, versions))
        with torch.no_grad():
            fused = model(input_ids=ids).logits
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_forward_compiles_under_selective_recompute(dtype) -> None:
    from petkit.training.activations import activation_checkpointing

    model = _lora_llama()
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    ids = torch.randint(3, 100, (2, 8))

    def loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(input_ids=batch, labels=batch, use_cache=False).loss

    with fused_deltas(model, dtype, CPU), activation_checkpointing(model, 1, "selective"):
        explained = torch._dynamo.explain(loss)(ids)
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="aot_eager")(ids)
        eager = loss(ids)
    # one break at the model's entry: the copy of A runs eagerly before the graph (it reads
    # version counters); under compile_scope="blocks" it runs outside every compiled block
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert reasons and all("torch.compiler.disable()" in r for r in reasons), reasons
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def _train(kernels: str, out, checkpointing: str = "off", optimizer: str = "adamw"):
    model = _lora_llama()
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    runtime = pk.RuntimeConfig(device="cpu", kernels=kernels,
                               activation_checkpointing=checkpointing)
    config = pk.TrainConfig(max_steps=3, batch_size=4, log_every=1, progress=False,
                            runtime=runtime, output_dir=str(out), optimizer=optimizer)
    return model, pk.train(model, data, config)


def test_train_with_fused_on_the_cpu_keeps_the_eager_delta_and_says_so(tmp_path) -> None:
    _, result = _train("fused", tmp_path)
    assert result.report["kernels"] == \
        "eager delta; liger off; fused delta off on cpu (it runs on cuda)"
    assert "kernels: eager delta" in (tmp_path / "train.log").read_text()


def test_train_fused_equals_eager_and_saves_the_same_adapter(tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    monkeypatch.setattr(fused_delta, "FUSED_DEVICES", CPU)
    eager_model, eager = _train("none", tmp_path / "eager", "selective")
    fused_model, fused = _train("fused", tmp_path / "fused", "selective")
    assert fused.report["kernels"] == "fused delta on 14 of 14 delta layers; liger off"
    assert "kernels" not in eager.report
    losses = [[h["train_loss"] for h in r.history if "train_loss" in h] for r in (eager, fused)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    want = load_file(tmp_path / "eager" / "adapter" / "adapter.safetensors")
    got = load_file(tmp_path / "fused" / "adapter" / "adapter.safetensors")
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-5)
    fresh = llama()  # the base weights are bitwise as before: the fingerprint check passes
    pk.load_adapter(fresh, tmp_path / "fused" / "adapter", strict=True)
    ids = torch.randint(3, 100, (1, 8))
    torch.testing.assert_close(fresh(input_ids=ids).logits, fused_model.eval()(input_ids=ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,out_f,in_f", [(1024, 256, 512), (64, 256, 512), (64, 512, 256)])
def test_fused_function_bf16_on_cuda(tokens, out_f, in_f) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": gen}
    x = torch.randn(4, tokens, in_f, **kw).bfloat16()
    w = (torch.randn(out_f, in_f, **kw) / in_f**0.5).bfloat16()
    a, b = torch.randn(16, in_f, **kw) / in_f**0.5, torch.randn(out_f, 16, **kw) / 4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = _grads(_eager, x, w, a, b, 2.0), _grads(_fused, x, w, a, b, 2.0)
    for ref, out in zip(want, got):
        scale = float(ref.float().abs().max())
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2 * scale)


@pytest.mark.gpu
def test_a_tiny_llama_bf16_on_cuda_gives_the_same_loss_and_gradients() -> None:
    model = _lora_llama().cuda()
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 32), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in pk.trainable_parameters(model).items()}

    loss0, grads0 = run()
    with fused_deltas(model, torch.bfloat16) as report:
        assert report.fused == 14
        loss1, grads1 = run()
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-2)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=0,
                                   atol=3e-2 * float(grad.abs().max()))


def test_zeroth_order_training_sees_every_perturbation_of_a(tmp_path, monkeypatch) -> None:
    """MeZO perturbs A in place between forwards, with no optimiser step."""
    monkeypatch.setattr(fused_delta, "FUSED_DEVICES", CPU)
    runs = [_train(kernels, tmp_path / kernels, optimizer="mezo")[1] for kernels in ("none", "fused")]
    losses = [[h["train_loss"] for h in r.history if "train_loss" in h] for r in runs]
    assert runs[1].report["kernels"].startswith("fused delta on 14")
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
