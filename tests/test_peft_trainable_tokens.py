"""A trainable-tokens export loads in the installed PEFT with no warning of its own: no
`modules_to_save` key (PEFT's TrainableTokensConfig has none), and on a tied output head
(GPT-2) the rows under the head's name too, as PEFT saves them."""
import copy
import json
import warnings

import pytest
from safetensors.torch import load_file

import petkit as pk
from toys import gpt2, inputs, llama, perturb, run

peft = pytest.importorskip("peft")


def peft_warnings(caught: list) -> list[str]:
    """Warnings raised while PEFT loads, but transformers' own deprecation notice."""
    return [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]


@pytest.mark.parametrize("toy,embedding,tied", [(gpt2, "transformer.wte", "lm_head"),
                                                 (llama, "model.embed_tokens", None)])
def test_trainable_tokens_export_loads_in_peft_without_warnings(toy, embedding, tied, tmp_path):
    base, batch = toy(), inputs("llama")
    theirs = copy.deepcopy(base)
    pk.attach(base, pk.TrainableTokensConfig(token_indices=(3, 5, 7)))
    perturb(pk.trainable_parameters(base), seed=3)
    expected = run(base, batch)
    pk.export_peft(base, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "modules_to_save" not in config
    keys = set(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    heads = {f"base_model.model.{tied}.trainable_tokens_delta"} if tied else set()
    assert keys == {f"base_model.model.{embedding}.trainable_tokens_delta"} | heads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(theirs, tmp_path / "out").eval()
    assert peft_warnings(caught) == []
    assert (run(loaded, batch) - expected).abs().max() <= 1e-5
    again = pk.import_peft(toy(), tmp_path / "out")  # the head's copy is not read back
    assert (run(again, batch) - expected).abs().max() <= 1e-5


def test_trainable_tokens_with_modules_to_save_is_refused(tmp_path):
    model = llama()
    pk.attach(model, pk.TrainableTokensConfig(token_indices=(3,), modules_to_save=("model.norm",)))
    with pytest.raises(pk.AdapterStateError, match="TRAINABLE_TOKENS.*modules_to_save"):
        pk.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
