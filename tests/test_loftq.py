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
