"""DoRA interop proven against the real `peft` package (use_dora=True), both directions, after training."""
import copy

import pytest
import torch

import petkit as pk
from toys import gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")


def peft_dora_train(model, target_modules, batch):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, use_dora=True)
    p = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-2)
    p.train()
    for _ in range(5):
        opt.zero_grad()
        p(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return p.eval()


@pytest.mark.parametrize("make,toy,targets", [(llama, "llama", ["q_proj", "v_proj"]), (gpt2, "gpt2", ["c_attn"])])
def test_peft_trained_dora_loads_in_petkit_with_identical_outputs(make, toy, targets, tmp_path):
    batch = inputs(toy)
    base = make()
    ours = copy.deepcopy(base)
    p = peft_dora_train(base, targets, batch)
    expected = run(p, batch)
    p.save_pretrained(tmp_path / "peft")
    pk.import_peft(ours, tmp_path / "peft")
    assert pk.adapters(ours)["default"].config.method == "dora"
    torch.testing.assert_close(run(ours, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,toy", [(llama, "llama"), (gpt2, "gpt2")])
def test_petkit_dora_loads_in_peft_with_identical_outputs(make, toy, tmp_path):
    batch = inputs(toy)
    base = make()
    theirs = copy.deepcopy(base)
    pk.attach(base, pk.DoraConfig(r=4, alpha=8))
    perturb(pk.trainable_parameters(base))
    expected = run(base, batch)
    pk.export_peft(base, tmp_path / "out")
    p = peft.PeftModel.from_pretrained(theirs, tmp_path / "out").eval()
    torch.testing.assert_close(run(p, batch), expected, rtol=1e-5, atol=1e-6)
    merged = p.merge_and_unload()  # PEFT's merge of our adapter equals petkit's merge
    pk.merge(base)
    torch.testing.assert_close(run(merged, batch), run(base, batch), rtol=1e-5, atol=1e-5)
