"""LoftQ (`init="loftq"` + `pk.loftq`): the LoRA layers' bases become nf4, and s B A starts at the
top-r SVD part of what quantisation lost (closed form); the adapter reloads onto the same
quantised base; mistakes are clear errors."""
import copy

import pytest
import torch

import petkit as pk
from petkit.core.delta import innermost, iter_deltas
from petkit.core.qweight import dense_weight, is_quantized_weight
from petkit.models.loftq import loftq
from toys import inputs, llama, run

pytest.importorskip("bitsandbytes")
QV = ["q_proj", "v_proj"]


def test_loftq_starts_at_the_svd_of_the_quantisation_error(tmp_path):
    model, batch = llama(), inputs("llama")
    reference, again = copy.deepcopy(model), copy.deepcopy(model)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(QV))}
    plain = pk.quantize(copy.deepcopy(model), "nf4", targets=QV)
    pk.attach(model, pk.LoraConfig(r=4, alpha=8, targets=QV, init="loftq"))
    loftq(model, "nf4")
    for path, w in iter_deltas(model):
        inner = innermost(w)
        assert is_quantized_weight(inner.weight)
        lost = originals[path] - dense_weight(inner, torch.float32)
        u, s, vh = torch.linalg.svd(lost)
        part = w.scaling * w.lora_B @ w.lora_A
        assert (part - u[:, :4] * s[:4] @ vh[:4]).abs().max() <= 1e-5
        assert torch.linalg.matrix_norm(lost - part) < torch.linalg.matrix_norm(lost)
    want = run(reference, batch)
    assert (run(model, batch) - want).abs().mean() < (run(plain, batch) - want).abs().mean()
    pk.save_adapter(model, tmp_path / "a")
    pk.quantize(again, "nf4", targets=QV)  # one iteration: the base is pk.quantize's
    pk.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(run(again, batch), run(model, batch), rtol=0, atol=0)


def test_loftq_mistakes_are_clear():
    model = llama()
    pk.attach(model, pk.LoraConfig(r=4, targets=QV))
    with pytest.raises(pk.ConfigError, match="--method.init loftq"):
        loftq(model, "nf4")
    model = llama()
    pk.attach(model, pk.LoraConfig(r=4, targets=QV, init="loftq"))
    with pytest.raises(pk.ConfigError, match="iters"):
        loftq(model, "nf4", iters=0)
    with pytest.raises(pk.ConfigError, match="waits for pk.loftq"):
        pk.initialize(model, [inputs("llama")])  # what pk.train meets before pk.loftq ran


def test_loftq_of_all_linear_layers_is_pk_quantize_base_plus_the_adapter(tmp_path):
    """all_linear=True (what `petkit train --method.init loftq` runs): the other linear layers are
    quantised as pk.quantize does, so the adapter reloads onto pk.quantize(model) exactly."""
    model, batch = llama(), inputs("llama")
    again = copy.deepcopy(model)
    pk.attach(model, pk.LoraConfig(r=4, alpha=8, targets=QV, init="loftq"))
    loftq(model, "nf4", all_linear=True)
    quantised = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and is_quantized_weight(m.weight)]
    assert any(n.endswith("o_proj") for n in quantised) and any("q_proj" in n for n in quantised)
    pk.save_adapter(model, tmp_path / "a")
    pk.quantize(again, "nf4")
    pk.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(run(again, batch), run(model, batch), rtol=0, atol=0)


@pytest.mark.slow
def test_cli_trains_a_loftq_lora_and_its_run_reloads_the_same_base(tmp_path):
    """`petkit train --method.init loftq` (no --model.quantize: nf4): the run records
    model.quantize, and the adapter evaluated from the run folder scores what the run reported."""
    import dataclasses
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petkit.app.adapter_base import recipe_for_adapter
    from petkit.app.pipeline import load_with_adapter, test_metrics
    from petkit.cli import main
    from petkit.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert main(["train", "--model", str(tmp_path / "model"), "--method", "lora", "--method.init", "loftq",
                 "--steps", "2", "--train-size", "16", "--test-size", "8", "--max-length", "32",
                 "--batch-size", "4", "--output", str(tmp_path / "run"), "--train.progress=false"]) == 0
    recipe = recipe_for_adapter(tmp_path / "run" / "adapter")
    assert recipe.model.quantize == "nf4"
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, test_size=8))
    prep = load_with_adapter(recipe, tmp_path / "run" / "adapter")
    reported = json.loads((tmp_path / "run" / "results.json").read_text())["after"]
    assert test_metrics(prep, recipe, "test") == reported
