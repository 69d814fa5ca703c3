"""Target matching: exact / suffix / regex / all-linear, and clear errors."""
import pytest

import petkit as pk
from petkit.core.targets import match_targets
from toys import bert_cls, gpt2, llama, mlp


def test_suffix_and_exact_entries():
    m = llama()
    paths = match_targets(m, ["q_proj", "model.layers.0.self_attn.v_proj"])
    assert paths == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]


def test_suffix_does_not_match_inside_a_name():
    with pytest.raises(pk.TargetError, match="'proj' matched no module"):
        match_targets(llama(), ["proj"])


def test_regex_full_match():
    paths = match_targets(llama(), r".*layers\.1\..*_proj")
    assert paths and all(".layers.1." in p for p in paths)


def test_all_linear_excludes_output_head():
    for model, head in ((llama(), "lm_head"), (gpt2(), "lm_head"), (bert_cls(), "classifier"), (mlp(), "out")):
        paths = match_targets(model, "all-linear")
        assert paths and head not in paths


def test_gpt2_conv1d_is_linear():
    assert match_targets(gpt2(), ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_a_list_entry_that_matches_nothing_is_an_error_even_if_others_match():
    m = llama()
    with pytest.raises(pk.TargetError, match="'q_prj' matched no module.*q_proj"):
        pk.attach(m, pk.LoraConfig(targets=["v_proj", "q_prj"]))
    assert not pk.adapters(m)  # nothing attached
    assert all(p.requires_grad for p in m.parameters())


def test_wrong_module_type_is_named():
    with pytest.raises(pk.TargetError, match="LlamaMLP"):
        pk.attach(llama(), pk.LoraConfig(targets=["mlp"]))


def test_bad_regex():
    with pytest.raises(pk.TargetError, match="invalid"):
        pk.attach(llama(), pk.LoraConfig(targets="(("))


def test_prompt_on_a_plain_module_is_a_target_error():
    with pytest.raises(pk.TargetError, match="input embeddings"):
        pk.attach(mlp(), pk.PromptConfig())


def test_defaults_attach_to_common_architectures_without_targets():
    for make in (llama, gpt2, bert_cls, mlp):
        for method in ("lora", "adapter", "bitfit"):
            m = make()
            pk.attach(m, pk.make_config(method))
            assert pk.trainable_parameters(m)
