"""Every method PEFT also has exchanges with the installed PEFT, both directions, with the same
logits (max difference <= 1e-5): petkit -> export_peft -> PeftModel.from_pretrained, and
PEFT (trained values) -> save_pretrained -> import_peft. Methods PEFT lacks are refused."""
import copy

import pytest
import torch

import petkit as pk
from petkit.core.peft_interop import exchangeable
from toys import gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")

QV = ["q_proj", "v_proj"]
# (petkit method, its config, PEFT's config of the same adapter, toy)
CASES = [
    ("loha", {"r": 2, "alpha": 4.0}, lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV), llama),
    ("lokr", {"r": 1, "alpha": 2.0}, lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=QV), llama),
    ("lokr", {"r": 1, "decompose_both": True, "factor": 4},
     lambda: peft.LoKrConfig(r=1, alpha=8, decompose_both=True, decompose_factor=4, target_modules=QV), llama),
    ("hira", {"r": 2}, lambda: peft.HiraConfig(r=2, target_modules=QV), llama),
    ("shira", {"r": 2, "random_seed": 7}, lambda: peft.ShiraConfig(r=2, random_seed=7, target_modules=QV), llama),
    ("vera", {"r": 16}, lambda: peft.VeraConfig(r=16, target_modules=QV), llama),
    ("oft", {"block_size": 8}, lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV), llama),
    ("oft", {"block_size": 4, "block_share": True, "neumann_terms": 0},
     lambda: peft.OFTConfig(r=0, oft_block_size=4, block_share=True, use_cayley_neumann=False,
                            target_modules=QV), llama),
    ("boft", {"block_size": 4}, lambda: peft.BOFTConfig(boft_block_size=4, target_modules=QV), llama),
    ("boft", {"block_size": 8}, lambda: peft.BOFTConfig(boft_block_size=8, target_modules=QV), llama),
    ("lora", {"r": 4, "alpha": 8.0}, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV), llama),
    ("lora", {"r": 4, "alpha": 8.0, "init": "pissa"},
     lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="gaussian"), llama),
    ("hra", {"r": 4}, lambda: peft.HRAConfig(r=4, target_modules=QV), llama),
    ("hra", {"r": 2, "apply_gs": True}, lambda: peft.HRAConfig(r=2, apply_GS=True, target_modules=QV), llama),
    ("adalora", {"init_r": 4, "target_r": 2},
     lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=QV), llama),
    ("lily", {"r": 4, "stride_A": 2, "num_B": 3, "scaling": 0.5},
     lambda: peft.LilyConfig(r=4, stride_A=2, num_B=3, scaling=0.5, target_modules=QV), llama),
    ("lily", {"r": 8}, lambda: peft.LilyConfig(r=8, target_modules=QV), llama),
    ("ia3", {}, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]), llama),
    ("ia3", {}, lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                       fan_in_fan_out=True), gpt2),
    ("ln-tuning", {}, lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm",
                                                                  "norm"]), llama),
    ("ln-tuning", {}, lambda: peft.LNTuningConfig(target_modules=["ln_1", "ln_2", "ln_f"]), gpt2),
    ("trainable-tokens", {"token_indices": [3, 5, 7]},
     lambda: peft.TrainableTokensConfig(token_indices=[3, 5, 7], target_modules=["embed_tokens"]), llama),
    ("trainable-tokens", {"token_indices": [4, 9]},
     lambda: peft.TrainableTokensConfig(token_indices=[4, 9], target_modules=["wte"]), gpt2),
]
IDS = [f"{m}-{i}" for i, (m, *_) in enumerate(CASES)]


def close(a, b):
    assert (a - b).abs().max() <= 1e-5, float((a - b).abs().max())


@pytest.mark.parametrize("method,kwargs,make_peft,toy", CASES, ids=IDS)
def test_petkit_adapter_loads_in_peft_with_the_same_logits(method, kwargs, make_peft, toy, tmp_path):
    base, batch = toy(), inputs("llama")
    theirs = copy.deepcopy(base)
    targets = None if method in ("trainable-tokens", "ln-tuning", "ia3") else QV
    pk.attach(base, pk.make_config(method, targets=targets, **kwargs))
    perturb(pk.trainable_parameters(base), seed=3)
    expected = run(base, batch)
    pk.export_peft(base, tmp_path / "out")
    p = peft.PeftModel.from_pretrained(theirs, tmp_path / "out").eval()
    close(run(p, batch), expected)


@pytest.mark.parametrize("method,kwargs,make_peft,toy", CASES, ids=IDS)
def test_peft_adapter_loads_in_petkit_with_the_same_logits(method, kwargs, make_peft, toy, tmp_path):
    base, batch = toy(), inputs("llama")
    ours = copy.deepcopy(base)
    p = peft.get_peft_model(base, make_peft())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # values away from the identity init, as training leaves them
        for q in p.parameters():
            if q.requires_grad:
                q.add_(torch.randn(q.shape, generator=g) * 0.1)
    p.eval()
    expected = run(p, batch)
    p.save_pretrained(tmp_path / "peft")
    pk.import_peft(ours, tmp_path / "peft")
    assert pk.adapters(ours)["default"].config.method == method
    close(run(ours, batch), expected)


def test_every_exchangeable_method_has_a_case_and_the_others_are_refused(tmp_path):
    # LoRA and DoRA: test_peft_interop.py, LoRA on MoE experts: test_moe.py, prompts: test_peft_prompts.py
    assert set(exchangeable()) - {"lora", "dora", "prompt", "prefix"} <= {m for m, *_ in CASES}
    m = llama()
    pk.attach(m, pk.KronaConfig())
    with pytest.raises(pk.AdapterStateError, match="'krona', which PEFT does not have"):
        pk.export_peft(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()
