"""LoRA on mixture-of-experts weights (`LoraConfig(target_parameters=...)`) on transformers' MoE
models, whose experts are 3-D parameters: the closed form per expert, chosen experts only, the
router trained as a copy, training, merge, save/load, and exchange with PEFT 0.21's
`target_parameters` layout in both directions (max logit difference <= 1e-5)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import petkit as pk
from petkit.methods.family.lora_experts import LoraExperts
from petkit.models import tiny_model

peft = pytest.importorskip("peft")

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
BOTH = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])


def moe(arch: str = "mixtral") -> torch.nn.Module:
    return tiny_model(arch, seed=0)[0].eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(arch: str = "mixtral", **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base, the base with a LoRA on its experts whose factors hold seeded random values)."""
    base = moe(arch)
    model = pk.attach(copy.deepcopy(base), pk.LoraConfig(r=2, alpha=4.0, **kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pk.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return base, model


def experts_of(model: torch.nn.Module, layer: int = 0) -> torch.nn.Module:
    return model.model.layers[layer].mlp.experts


def test_each_expert_gets_its_own_low_rank_delta_closed_form():
    """W'[e] = W[e] + (alpha / r) B_e A_e for both parameters; the wrapped experts module computes
    exactly what the base module computes with W' written in."""
    base, model = trained(target_parameters=BOTH)
    wrapper = experts_of(model)
    assert isinstance(wrapper, LoraExperts)
    reference = copy.deepcopy(experts_of(base))
    with torch.no_grad():
        for pname in ("gate_up_proj", "down_proj"):
            a, b = wrapper.lora_A[pname], wrapper.lora_B[pname]
            weight = getattr(reference, pname)
            assert a.shape == (4, 2, weight.shape[2]) and b.shape == (4, weight.shape[1], 2)
            for e in range(4):
                weight[e] += 2.0 * b[e] @ a[e]
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    top_k = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(hidden, top_k, weights), reference(hidden, top_k, weights),
                                   rtol=1e-5, atol=1e-6)


def test_factors_start_as_peft_draws_them_and_the_delta_at_zero():
    """A Kaiming-uniform with PEFT's bound 1/sqrt(in) per expert (gaussian: std 1/r), B = 0."""
    for init, check in (("default", lambda a, fan_in: a.abs().max() <= 1 / fan_in ** 0.5),
                        ("gaussian", lambda a, fan_in: abs(a.std().item() - 1 / 4) < 0.05)):
        model = pk.attach(moe(), pk.LoraConfig(r=4, target_parameters=BOTH, init=init))
        wrapper = experts_of(model)
        for pname in BOTH:
            a = wrapper.lora_A[pname.split(".")[1]]
            assert check(a, a.shape[-1]) and a.abs().max() > 0
            assert wrapper.lora_B[pname.split(".")[1]].abs().max() == 0


def test_chosen_experts_only_change_those_experts():
    _, model = trained(target_parameters=BOTH, experts=[1, 3])
    wrapper = experts_of(model)
    assert wrapper.lora_A["gate_up_proj"].shape[0] == 2
    for pname, delta in wrapper.merge_deltas().items():
        assert delta.shape == getattr(wrapper.base, pname).shape
        assert delta[[0, 2]].abs().max() == 0 and delta[1].abs().max() > 0 and delta[3].abs().max() > 0


def test_experts_and_router_train_and_the_base_does_not():
    base = moe()
    model = pk.attach(copy.deepcopy(base), pk.LoraConfig(r=2, target_parameters=BOTH, modules_to_save=["mlp.gate"]))
    params = pk.trainable_parameters(model)
    assert any(".copy." in n for n in params) and any("lora_B.gate_up_proj" in n for n in params)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    with pk.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"target_parameters": BOTH, "modules_to_save": ["mlp.gate"]},
                                    {"target_parameters": ["experts.down_proj"], "experts": [2]}])
def test_merge_equals_unmerged_and_save_load_is_exact(kwargs, tmp_path):
    base, model = trained(**kwargs)
    expected = logits(model)
    assert not torch.allclose(expected, logits(base))
    pk.save_adapter(model, tmp_path / "ad")
    other = pk.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    torch.testing.assert_close(logits(other), expected, rtol=0, atol=0)
    pk.merge(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    pk.unmerge(model)
    with pk.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=1e-6, atol=1e-6)
    plain = pk.unload(model, merge=True)
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)


CONFIGS = [{"target_parameters": BOTH},
           {"target_parameters": BOTH, "experts": [1, 3]},
           {"target_parameters": ["experts.down_proj"], "targets": ["q_proj", "v_proj"],
            "modules_to_save": ["mlp.gate"], "rslora": True}]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kwargs", CONFIGS, ids=["all", "chosen", "with-modules-and-router"])
def test_export_loads_in_peft_and_back_with_the_same_logits(arch, kwargs, tmp_path):
    base, model = trained(arch, **kwargs)
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 1e-2
    pk.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == kwargs["target_parameters"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert (logits(theirs) - expected).abs().max() <= 1e-5
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(ours) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_a_peft_saved_expert_adapter_loads_with_the_same_logits(arch, tmp_path):
    base = moe(arch)
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj"], init_lora_weights=False,
                             target_parameters=["experts.down_proj", "experts.gate_up_proj"], modules_to_save=["gate"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    expected = logits(theirs)
    assert (expected - logits(base)).abs().max() > 1e-2
    ours = pk.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(ours) - expected).abs().max() <= 1e-5
    assert set(pk.adapters(ours)["default"].config.target_parameters) == set(BOTH)


def test_export_writes_peft_own_names_and_shapes(tmp_path):
    """The same adapter saved by PEFT and exported by petkit hold the same keys and shapes
    (nested names for two parameters of one module: the first registered is `base_layer.`)."""
    from safetensors.torch import load_file

    base = moe()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[], target_parameters=BOTH))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    _, model = trained(target_parameters=BOTH)
    pk.export_peft(model, tmp_path / "ours")
    shapes = [{k: tuple(v.shape) for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()}
              for d in ("theirs", "ours")]
    assert shapes[0] == shapes[1]
    assert shapes[1]["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (8, 32)


def test_mistakes_are_clear_errors(tmp_path):
    model = moe()
    with pytest.raises(pk.TargetError, match="gate_up_proj"):
        pk.attach(model, pk.LoraConfig(target_parameters=["experts.gate_proj"]))
    with pytest.raises(pk.TargetError, match="3-D"):
        pk.attach(model, pk.LoraConfig(target_parameters=["self_attn.q_proj.weight"]))
    with pytest.raises(pk.TargetError, match="out of range"):
        pk.attach(model, pk.LoraConfig(target_parameters=BOTH, experts=[0, 4]))
    with pytest.raises(pk.ConfigError, match="dropout"):
        pk.LoraConfig(target_parameters=BOTH, dropout=0.1)
    with pytest.raises(pk.ConfigError, match="target_parameters too"):
        pk.LoraConfig(experts=[1])
    with pytest.raises(pk.ConfigError, match="distinct"):
        pk.LoraConfig(target_parameters=BOTH, experts=[1, 1])
    with pytest.raises(pk.ConfigError, match="init='pissa'"):
        pk.LoraConfig(target_parameters=BOTH, init="pissa")
    assert not pk.adapters(model)
    _, trained_model = trained(target_parameters=BOTH)
    pk.export_peft(trained_model, tmp_path / "peft")
    other = tiny_model("qwen3_moe", seed=0)[0]  # experts of other shapes
    with pytest.raises(pk.AdapterLoadError):
        pk.import_peft(other, tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    config_path = tmp_path / "peft" / "adapter_config.json"
    good = config_path.read_text()
    for bad, needle in ((5, "must be a list"), (["experts.nope"], "matched no parameter")):
        config_path.write_text(json.dumps({**json.loads(good), "target_parameters": bad}))
        with pytest.raises(pk.AdapterLoadError, match=needle):
            pk.import_peft(moe(), tmp_path / "peft")
    config_path.write_text(good)
    del tensors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(pk.AdapterLoadError, match="no 'base_model.model.model.layers.1.mlp.experts.lora_B.weight'"):
        pk.import_peft(moe(), tmp_path / "peft")


def test_vllm_export_is_refused_with_the_reason(tmp_path):
    from petkit.app.export import vllm_refusal

    _, model = trained(target_parameters=["experts.down_proj"])
    assert "target_parameters" in vllm_refusal(pk.save_adapter(model, tmp_path / "ad"))


@pytest.mark.slow
def test_cli_trains_experts_and_router_and_exports_them_to_peft(tmp_path):
    """`petkit train --method.target_parameters ...` on a saved tiny Mixtral (SmolLM2's tokenizer),
    then `petkit export --format peft`: PEFT loads the folder with petkit's logits."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from petkit.cli import main
    from petkit.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert main(["train", "--model", str(tmp_path / "model"), "--method", "lora", "--method.r=2",
                 "--method.target_parameters=experts.gate_up_proj,experts.down_proj",
                 "--method.modules_to_save=[mlp.gate]", "--steps", "2", "--train-size", "16", "--test-size", "8",
                 "--max-length", "32", "--batch-size", "4", "--output", str(tmp_path / "run"),
                 "--train.progress=false"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert main(["export", "--adapter", str(adapter), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    base = MixtralForCausalLM.from_pretrained(tmp_path / "model").eval()
    ours = pk.load_adapter(copy.deepcopy(base), adapter)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5
    assert (logits(ours) - logits(base)).abs().max() > 0
