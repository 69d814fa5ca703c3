"""`--runtime.kernels` / `--runtime.liger`: validation, the plan's rules (a clear error for
`liger`, a logged fallback for `auto`), and Liger's pieces wired into a model — checked on the CPU
with torch references of Liger's functions (same signatures), and with Liger itself on CUDA."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import petkit as pk
from petkit.core.errors import ConfigError, MissingPackageError
from petkit.training import kernels
from petkit.training.kernels import kernel_parts, plan_kernels
from petkit.training.liger import Provider, liger_pieces
from petkit.training.lm_loss import HeadBypass
from toys import bert_cls, llama

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("value", ["none", "auto", "fused", "liger", "fused,liger", "liger, fused"])
def test_kernel_values_accepted(value: str) -> None:
    assert pk.RuntimeConfig(kernels=value).kernels == value


@pytest.mark.parametrize("value,needle", [
    ("lgier", "did you mean 'liger'"), ("fused,auto", "none, auto, or fused and/or liger"),
    ("", "none, auto, or fused"), ("none,fused", "none, auto, or fused")])
def test_bad_kernel_values_name_the_flag(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="--runtime.kernels") as err:
        pk.RuntimeConfig(kernels=value)
    assert needle in str(err.value)


def test_bad_liger_pieces_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--runtime.liger: unknown piece 'rmsnrm' \(did you "
                                          r"mean 'rmsnorm'\?\)"):
        pk.RuntimeConfig(kernels="liger", liger="flce,rmsnrm")
    with pytest.raises(ConfigError, match="--runtime.liger must name pieces"):
        pk.RuntimeConfig(liger=" , ")


def test_runtime_round_trips_the_new_fields_and_they_are_no_flat_train_keys() -> None:
    runtime = pk.RuntimeConfig(kernels="fused,liger", liger="flce,rope")
    assert pk.RuntimeConfig.from_dict(runtime.to_dict()) == runtime
    with pytest.raises(TypeError):
        pk.TrainConfig(kernels="fused")  # runtime-only: no deprecated flat key
    assert kernel_parts("none") == ()


def test_liger_on_the_cpu_is_a_clear_error_and_auto_falls_back() -> None:
    model = llama()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        plan_kernels("liger", "flce", model, CPU, None)
    plan = plan_kernels("auto", "flce", model, CPU, None)
    assert not plan.fused and not plan.liger
    fused_off = "fused delta off on cpu (it runs on cuda); " if kernels.AUTO_DELTA else ""
    assert plan.note() == ("eager delta; " + fused_off + "liger off (--runtime.kernels="
                           "liger needs a CUDA device (Liger's kernels are Triton), the run is on cpu)")


def test_liger_without_the_package_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    import petkit.training.kernels as kernels

    monkeypatch.setattr(kernels, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"pip install 'petkit\[kernels\]'"):
        plan_kernels("liger", "flce", llama(), CUDA, None)
    plan = plan_kernels("auto", "flce", llama(), CUDA, None)  # CUDA: the fused delta as measured
    assert plan.fused == (kernels.AUTO_DELTA is not None) and not plan.liger
    assert "liger off" in plan.note()


def _reference() -> tuple[Provider, dict[str, int]]:
    """Torch versions of Liger's functions, counting their calls."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0, "flce": 0}

    def rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def turn(t):
            half = t.shape[-1] // 2
            return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    def swiglu(a, b):
        calls["swiglu"] += 1
        return F.silu(a) * b

    def flce(hidden, weight, target, bias, ignore_index):
        calls["flce"] += 1
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")

    return Provider(rms_norm=rms_norm, rope=rope, swiglu=swiglu, flce=flce), calls


def _lora_llama() -> torch.nn.Module:
    model = llama()
    torch.manual_seed(0)
    pk.attach(model, pk.LoraConfig(r=4, targets="all-linear"))
    with torch.no_grad():
        for param in pk.trainable_parameters(model).values():
            param.normal_(0, 0.2)
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in pk.trainable_parameters(model).items()}


def test_every_liger_piece_is_wired_in_and_the_model_is_restored() -> None:
    import transformers.models.llama.modeling_llama as modeling

    model, (provider, calls) = _lora_llama(), _reference()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    rope_before = modeling.apply_rotary_pos_emb
    bypass = HeadBypass(model)
    plan = plan_kernels("liger", "flce,rmsnorm,rope,swiglu", model, CPU, bypass, provider)
    assert plan.liger == ("flce", "rmsnorm", "rope", "swiglu")
    with bypass.installed(), plan.installed(model, bypass, torch.float32):
        loss1, grads1 = _loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    assert calls == {"rms_norm": 2 * layers + 1, "rope": layers, "swiglu": layers, "flce": 1}
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=1e-4, atol=1e-6)
    assert modeling.apply_rotary_pos_emb is rope_before and bypass.fused is None
    assert not any("forward" in vars(m) for m in model.modules())
    assert plan.note() == "eager delta; liger flce,rmsnorm,rope,swiglu"


def test_liger_refuses_a_piece_the_model_lacks_and_auto_keeps_only_those_it_has() -> None:
    provider, _ = _reference()
    with pytest.raises(ConfigError, match="--runtime.liger=flce: needs the chunked-loss"):
        plan_kernels("liger", "flce", llama(), CPU, None, provider)  # no head bypass
    with pytest.raises(ConfigError, match="supports the llama, mistral, qwen2, qwen3 families, "
                                          "not 'bert'"):
        plan_kernels("liger", "rmsnorm", bert_cls(), CPU, None, provider)
    model = llama()
    plan = plan_kernels("auto", "flce", model, CPU, None, provider)
    assert plan.liger == () and "liger flce off (needs the chunked-loss" in plan.note()


def test_flce_is_dropped_with_a_note_when_the_run_loses_its_head_bypass() -> None:
    model, (provider, calls) = _lora_llama(), _reference()
    plan = plan_kernels("liger", "flce,swiglu", model, CPU, HeadBypass(model), provider)
    with plan.installed(model, None, torch.float32):  # e.g. a preference objective of its own
        model(input_ids=torch.randint(3, 100, (1, 6)))
    assert plan.liger == ("swiglu",) and calls["flce"] == 0 and calls["swiglu"] > 0
    assert "liger flce off (the run computes its loss another way)" in plan.note()


def test_liger_pieces_refuse_a_piece_without_modules() -> None:
    provider, _ = _reference()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="no rmsnorm module"):
        with liger_pieces(model, ("rmsnorm",), provider, None):
            pass


@pytest.mark.gpu
def test_liger_on_cuda_matches_the_torch_references() -> None:
    pytest.importorskip("liger_kernel")
    from petkit.training.liger import liger_provider

    model = _lora_llama().cuda()
    ids = torch.randint(3, 100, (2, 64), device="cuda")
    results = []
    for provider in (_reference()[0], liger_provider()):
        bypass = HeadBypass(model)
        plan = plan_kernels("liger", "flce,rmsnorm,rope,swiglu", model, CUDA, bypass, provider)
        with bypass.installed(), plan.installed(model, bypass, torch.float32):
            results.append(_loss_and_grads(model, ids))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-4)
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=1e-3, atol=1e-5)


def test_dataclass_fields_have_help() -> None:
    fields = {f.name: f for f in dataclasses.fields(pk.RuntimeConfig)}
    assert "Liger" in fields["kernels"].metadata["help"]
    assert "flce" in fields["liger"].metadata["help"]


def test_context_probe_doubles_then_bisects_to_the_resolution(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_context

    tried = []

    def launch(args, library, seq, limit):
        tried.append(seq)
        return {"fits": seq <= 40000, "seq": seq, "tok_s": 1.0, "peak_gib": 2.0}

    monkeypatch.setattr(gpu_context, "_launch", launch)
    args = gpu_context.parse(["--start", "8192", "--budget", "1000"])
    result = gpu_context.probe(args, "petkit", time.perf_counter() + 1000)
    assert tried == [8192, 16384, 32768, 65536, 49152, 40960, 36864]
    assert (result["longest"], result["shortest_failed"]) == (36864, 40960)
    tried.clear()
    args = gpu_context.parse(["--start", "131072"])  # the first try fails: halve first
    result = gpu_context.probe(args, "peft", time.perf_counter() + 1000)
    assert tried[:3] == [131072, 65536, 32768] and result["longest"] == 36864


@pytest.mark.parametrize("flag,needle", [
    ("--runtime.kernels=lgier", "did you mean 'liger'"),
    ("--runtime.liger=rmsnrm", "did you mean 'rmsnorm'"),
])
def test_a_bad_kernels_flag_is_one_red_line_and_exit_2(flag: str, needle: str, capsys) -> None:
    from petkit.cli import main

    assert main(["train", flag, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_preflight_refuses_liger_on_the_cpu_before_any_training() -> None:
    from petkit.training.loop import preflight

    model = _lora_llama()
    data = [{"input_ids": torch.arange(3, 9), "labels": torch.arange(3, 9)}]
    config = pk.TrainConfig(runtime=pk.RuntimeConfig(device="cpu", kernels="liger"))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        preflight(model, data, config)
    preflight(model, data, config.replace(runtime=pk.RuntimeConfig(device="cpu", kernels="auto")))
