"""DoRA interop proven against the real `peft` package (use_dora=True), both directions, after training."""
import copy

import pytest
import torch

import petkit as pk
from test_peft_interop import peft_train
from toys import gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("make,toy,targets", [(llama, "llama", ["q_proj", "v_proj"]), (gpt2, "gpt2", ["c_attn"])])
def test_peft_trained_dora_loads_in_petkit_with_identical_outputs(make, toy, targets, tmp_path):
    batch = inputs(toy)
    base = make()
    ours = copy.deepcopy(base)
    p = peft_train(base, targets, batch, use_dora=True)
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
