"""PEFT interop proven against the real `peft` package, both directions, after training."""
import copy

import pytest
import torch

import petkit as pk
from toys import gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")


def peft_train(model, target_modules, batch, **config):
    p = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **config))
    opt = torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-2)
    p.train()
    for _ in range(5):
        opt.zero_grad()
        p(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return p.eval()


@pytest.mark.parametrize("make,targets", [(llama, ["q_proj", "v_proj"]), (gpt2, ["c_attn"])])
def test_peft_trained_adapter_loads_in_petkit_with_identical_outputs(make, targets, tmp_path):
    batch = inputs("llama")
    base = make()
    ours = copy.deepcopy(base)
    p = peft_train(base, targets, batch)
    expected = run(p, batch)
    p.save_pretrained(tmp_path / "peft")
    pk.import_peft(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("make,toy", [(llama, "llama"), (gpt2, "gpt2")])
def test_petkit_adapter_loads_in_peft_with_identical_outputs(make, toy, tmp_path):
    batch = inputs(toy)
    base = make()
    theirs = copy.deepcopy(base)
    pk.attach(base, pk.LoraConfig(r=4, alpha=8, rslora=True))
    perturb(pk.trainable_parameters(base))
    expected = run(base, batch)
    pk.export_peft(base, tmp_path / "out")
    p = peft.PeftModel.from_pretrained(theirs, tmp_path / "out").eval()
    torch.testing.assert_close(run(p, batch), expected, rtol=0, atol=0)


def test_import_checks_what_peft_does_not(tmp_path):
    batch = inputs("llama")
    p = peft_train(llama(), ["q_proj"], batch)
    p.save_pretrained(tmp_path / "peft")
    with pytest.raises(pk.AdapterLoadError, match="does not fit"):
        pk.import_peft(gpt2(), tmp_path / "peft")
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(pk.AdapterLoadError, match="missing or empty"):
        pk.import_peft(llama(), tmp_path / "peft")


def test_export_of_non_lora_is_refused(tmp_path):
    m = llama()
    pk.attach(m, pk.AdapterConfig())
    with pytest.raises(pk.AdapterStateError, match="which PEFT does not have"):
        pk.export_peft(m, tmp_path / "x")
