"""Hybrid systems on tiny random models: transfer (PET-GC), porting (PORTLLM), DPO / MEET."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import petkit as pk
from petkit.core.errors import AdapterLoadError, ConfigError
from petkit.hybrid.port import ported_from
from petkit.hybrid.preference import DPOModel, dpo_loss, pair_collate, sequence_logp
from petkit.hybrid.transfer import depth_map, embedding_maps
from petkit.models import tiny_model
from petkit.models.tiny import TINY_VOCAB


def bert(layers: int = 2, width: int = 32, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=TINY_VOCAB, hidden_size=width, intermediate_size=2 * width,
                     num_hidden_layers=layers, num_attention_heads=4, num_labels=3,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def lora_head(targets: list[str] | None = None) -> pk.LoraConfig:
    return pk.LoraConfig(r=2, targets=targets or ["query", "value", "output.dense"],
                         modules_to_save=["classifier"])


def randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in pk.trainable_parameters(model).values():
            p.normal_(0, 0.3)


def test_depth_map_nearest_relative_depth() -> None:
    assert depth_map(3, 6) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    assert depth_map(4, 4) == {i: i for i in range(4)}


def texts(n: int = 8, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, TINY_VOCAB, (length,), generator=g).tolist(),
             "attention_mask": [1] * length, "labels": i % 3} for i in range(n)]


def test_embedding_alignment_to_the_same_model_is_exact() -> None:
    small = bert()
    pk.attach(small, lora_head())
    randomise(small)
    large = bert()
    x = torch.randint(0, TINY_VOCAB, (2, 9))
    t = pk.transfer_adapter("default", small, large, align="embeddings")
    assert t.alignment_error == 0.0 and t.layer_map == {0: 0, 1: 1} and t.align == "embeddings"
    assert torch.allclose(small(input_ids=x).logits, large(input_ids=x).logits, atol=1e-5)


def test_hidden_state_alignment_is_the_default_and_needs_texts() -> None:
    small, large = bert(), bert(seed=1)
    pk.attach(small, lora_head())
    with pytest.raises(ConfigError, match="align_data"):
        pk.transfer_adapter("default", small, large)
    with pytest.raises(ConfigError, match="align must be one of"):
        pk.transfer_adapter("default", small, large, align="vocab", align_data=texts())
    assert "default" not in pk.adapters(large)  # a refused transfer attaches nothing
    t = pk.transfer_adapter("default", small, large, align_data=texts())
    assert t.align == "hidden" and 0.0 < t.alignment_error < 1.0


def test_transfer_maps_depth_and_width(tmp_path) -> None:
    small, large = bert(layers=2, width=32), bert(layers=4, width=48, seed=1)
    pk.attach(small, lora_head())
    randomise(small)
    pk.save_adapter(small, tmp_path / "a")
    pk.transfer_adapter(tmp_path / "a", small, large, align="embeddings")
    state = pk.adapter_state(large, "default")
    a = state["bert.encoder.layer.3.attention.self.query.lora_A"]
    b = state["bert.encoder.layer.3.output.dense.lora_B"]
    assert a.shape == (2, 48) and b.shape == (48, 2)
    # layer 3 of 4 takes small layer 1; its A reads the residual stream through Q^T
    _, q, _ = embedding_maps(small, large)
    src = pk.adapter_state(small, "default")
    assert torch.allclose(a, src["bert.encoder.layer.1.attention.self.query.lora_A"] @ q.T,
                          atol=1e-5)
    assert torch.isfinite(large(input_ids=torch.randint(0, TINY_VOCAB, (1, 5))).logits).all()


def test_base_hidden_state_alignment_of_a_model_with_itself_is_exact() -> None:
    small = bert()
    pk.attach(small, lora_head())
    randomise(small)
    large = bert()
    t = pk.transfer_adapter("default", small, large, align="hidden-base", align_data=texts())
    x = torch.randint(0, TINY_VOCAB, (2, 9))
    assert t.alignment_error < 1e-4
    assert torch.allclose(small(input_ids=x).logits, large(input_ids=x).logits, atol=1e-3)


def test_default_alignment_reads_the_small_model_with_its_adapter() -> None:
    small = bert()
    pk.attach(small, lora_head())
    randomise(small)
    base, adapted = bert(), bert()
    pk.transfer_adapter("default", small, base, align="hidden-base", align_data=texts())
    pk.transfer_adapter("default", small, adapted, align_data=texts())
    x = torch.randint(0, TINY_VOCAB, (2, 9))
    key = "bert.encoder.layer.1.attention.self.query.lora_A"  # reads state 1: layer 0's output
    a_base, a_adapted = pk.adapter_state(base, "default")[key], pk.adapter_state(adapted, "default")[key]
    assert not torch.allclose(a_base, a_adapted)  # the maps differ once the adapter is on
    assert torch.isfinite(adapted(input_ids=x).logits).all()


def test_hidden_state_transfer_maps_depth_and_width() -> None:
    small, large = bert(layers=2, width=32), bert(layers=4, width=48, seed=1)
    pk.attach(small, lora_head())
    randomise(small)
    t = pk.transfer_adapter("default", small, large, align_data=texts(16))
    state = pk.adapter_state(large, "default")
    assert state["bert.encoder.layer.3.attention.self.query.lora_A"].shape == (2, 48)
    assert t.layer_map == {0: 0, 1: 0, 2: 1, 3: 1}
    assert torch.isfinite(large(input_ids=torch.randint(0, TINY_VOCAB, (1, 5))).logits).all()


def test_transfer_refuses_gradient_refinement() -> None:
    small, large = bert(), bert()
    pk.attach(small, lora_head())
    with pytest.raises(ConfigError, match="gradient-free"):
        pk.transfer_adapter("default", small, large, refine=pk.TrainConfig(max_steps=1),
                            refine_data=[{"input_ids": [1, 2], "labels": 0}])


def test_transfer_refines_with_mezo() -> None:
    small, large = bert(), bert(seed=1)
    pk.attach(small, lora_head())
    randomise(small)
    cfg = pk.TrainConfig(optimizer="mezo", lr=1e-3, max_steps=2, batch_size=4, progress=False)
    t = pk.transfer_adapter("default", small, large, refine=cfg, refine_data=texts())
    assert t.align == "hidden"  # aligned on the refinement texts
    assert t.refined is not None and t.refined.steps == 2


# --- porting --------------------------------------------------------------------------------


def evolved(model: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return new


def test_port_onto_identical_base_equals_original(tmp_path) -> None:
    old = tiny_model("llama")[0]
    pk.attach(old, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomise(old)
    pk.save_adapter(old, tmp_path / "a")
    x = torch.randint(0, TINY_VOCAB, (2, 6))
    want = old(input_ids=x).logits
    base = tiny_model("llama")[0]
    with pk.disabled(old):
        pass
    new = pk.port_adapter(tmp_path / "a", tiny_model("llama")[0], base, output=tmp_path / "p")
    assert torch.allclose(new(input_ids=x).logits, want, atol=1e-6)
    assert ported_from(tmp_path / "p")["tensors_sha256"] == \
        json.loads((tmp_path / "a" / "adapter.json").read_text())["tensors_sha256"]


def test_port_to_evolved_base_records_source_and_loads_strictly(tmp_path) -> None:
    old = bert()
    pk.attach(old, lora_head())
    randomise(old)
    pk.save_adapter(old, tmp_path / "a")
    new_base = evolved(bert())
    with pytest.raises(AdapterLoadError, match="different base"):
        pk.load_adapter(evolved(bert()), tmp_path / "a")
    pk.port_adapter(tmp_path / "a", bert(), new_base, output=tmp_path / "p")
    record = ported_from(tmp_path / "p")
    assert record is not None and record["source"].endswith("a")
    pk.load_adapter(evolved(bert()), tmp_path / "p")  # the new base's fingerprint: strict load
    # LoRA tensors carried unchanged; the head copy re-based: W_new + (W_old' - W_old)
    got, src = pk.adapter_state(new_base, "default"), pk.adapter_state(old, "default")
    key = "bert.encoder.layer.0.attention.self.query.lora_B"
    assert torch.equal(got[key], src[key])
    with pk.disabled(new_base):
        new_w = new_base.classifier.base.weight.detach().clone()
    want = new_w + (src["classifier.copy.weight"] - bert().classifier.weight)
    assert torch.allclose(got["classifier.copy.weight"], want, atol=1e-6)


def test_port_refuses_wrong_old_base(tmp_path) -> None:
    old = bert()
    pk.attach(old, lora_head())
    pk.save_adapter(old, tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="not trained on old_base"):
        pk.port_adapter(tmp_path / "a", bert(seed=3), bert())


# --- preference -----------------------------------------------------------------------------


def test_dpo_loss_equals_hand_computed_value() -> None:
    # policy/reference log-probs of (chosen, rejected) for one pair, beta 0.5
    loss = dpo_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]),
                    torch.tensor([-2.0]), beta=0.5)
    margin = (-2.0 + 2.5) - (-3.0 + 2.0)  # 1.5
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-0.5 * margin))), rel_tol=1e-6)


def test_sequence_logp_sums_answer_tokens_only() -> None:
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1]])
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(sequence_logp(logits, labels), logp[0, 1, 3] + logp[0, 2, 1])


def pair_batch() -> dict[str, torch.Tensor]:
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]},
             {"input_ids": [3, 4, 10], "labels": [-100, 4, 10],
              "rejected_input_ids": [3, 4, 11, 12], "rejected_labels": [-100, 4, 11, 12]}]
    return pair_collate(pairs, pad_id=0)


def test_dpo_gradient_flows_only_into_the_delta_and_reference_is_the_base() -> None:
    model = tiny_model("llama")[0]
    base = copy.deepcopy(model)
    pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomise(model)
    batch = pair_batch()
    with torch.no_grad(), pk.disabled(model):
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ref, plain, atol=1e-6)
    wrapper = DPOModel(model, beta=0.1)
    out = wrapper(**batch)
    out.loss.backward()
    delta = pk.trainable_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.values())
    ids = {id(p) for p in delta.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids)
    # the loss equals the formula on separately computed log-probs
    pol = sequence_logp(model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits, batch["labels"])
    r = sequence_logp(ref, batch["labels"])
    want = -F.logsigmoid(0.1 * ((pol[:2] - r[:2]) - (pol[2:] - r[2:]))).mean()
    assert torch.allclose(out.loss, want, atol=1e-6)


def test_dpo_at_identity_init_is_log2_and_training_raises_the_margin() -> None:
    model = tiny_model("llama")[0]
    pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    batch = pair_batch()
    assert math.isclose(float(DPOModel(model)(**batch).loss.detach()), math.log(2), rel_tol=1e-5)
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]}] * 8
    cfg = pk.TrainConfig(lr=5e-2, max_steps=10, batch_size=4, progress=False)
    pk.train_preference(model, pairs, cfg, beta=0.5)
    assert float(DPOModel(model, beta=0.5)(**batch).loss.detach()) < math.log(2)


def test_meet_trains_control_tokens_then_lora_with_them_fixed() -> None:
    from petkit.hybrid.preference import meet

    model = tiny_model("llama")[0]
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]}] * 4
    cfg = pk.TrainConfig(lr=1e-2, max_steps=2, batch_size=2, progress=False)
    meet(model, pairs, pk.make_config("prompt", num_virtual_tokens=2),
         pk.LoraConfig(r=2, targets=["q_proj"]), cfg)
    control = pk.adapter_state(model, "control")
    before = {k: v.clone() for k, v in control.items()}
    assert pk.active_adapters(model) == ["control", "meet"]
    pk.train_preference(model, pairs, cfg)
    assert all(torch.equal(before[k], v) for k, v in pk.adapter_state(model, "control").items())


def test_dpo_holds_no_second_copy_of_the_weights() -> None:
    model = tiny_model("llama")[0]
    pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj"]))
    storages = lambda m: {p.untyped_storage().data_ptr() for p in m.parameters()}  # noqa: E731
    assert storages(DPOModel(model)) == storages(model)


def test_dpo_trace_has_one_row_per_step_starting_at_the_reference() -> None:
    model = tiny_model("llama")[0]
    pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), seed=0)
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]}] * 8
    cfg = pk.TrainConfig(lr=5e-2, max_steps=3, batch_size=4, progress=False)
    trace = pk.train_preference(model, pairs, cfg, beta=0.5).report["dpo_trace"]
    assert len(trace) == 3
    first = trace[0]  # LoRA starts as the identity: policy == reference
    assert first["chosen"] == first["rejected"] == 0.0
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)
    assert first["chosen_token_logp"] == pytest.approx(first["ref_chosen_token_logp"])
    assert trace[-1]["chosen"] - trace[-1]["rejected"] > 0  # the margin grew


def test_meet_with_a_seed_does_not_depend_on_the_global_random_state() -> None:
    from petkit.hybrid.preference import meet

    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 9], "rejected_labels": [-100, -100, 9]}] * 4
    cfg = pk.TrainConfig(lr=1e-2, max_steps=1, batch_size=2, progress=False)

    def states(global_seed: int, seed: int | None) -> dict[str, torch.Tensor]:
        model = tiny_model("llama")[0]
        torch.manual_seed(global_seed)
        meet(model, pairs, pk.make_config("prompt", num_virtual_tokens=2),
             pk.LoraConfig(r=2, targets=["q_proj"]), cfg, seed=seed)
        return {f"{name}:{k}": v for name in ("control", "meet")
                for k, v in pk.adapter_state(model, name).items()}

    a, b = states(0, 7), states(1, 7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = states(0, 8)  # the seed decides the LoRA's initialisation
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("meet:"))


def test_rpo_adds_the_chosen_nll_per_token_to_the_dpo_loss() -> None:
    model = tiny_model("llama")[0]
    pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), seed=0)
    randomise(model)
    batch = pair_batch()
    plain = DPOModel(model, beta=0.1)(**batch).loss
    rpo = DPOModel(model, beta=0.1, rpo_alpha=0.5)(**batch).loss
    logp = sequence_logp(model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits, batch["labels"])
    chosen_tokens = 2 + 2  # answer tokens of the two chosen rows (labels other than -100, shifted)
    assert torch.allclose(rpo, plain - 0.5 * logp[:2].sum() / chosen_tokens, atol=1e-6)
    with pytest.raises(ConfigError, match="rpo_alpha"):
        DPOModel(model, rpo_alpha=-1.0)


def test_rpo_keeps_the_chosen_answers_likelihood_up() -> None:
    pairs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8],
              "rejected_input_ids": [5, 6, 7, 9], "rejected_labels": [-100, -100, 7, 9]}] * 8
    cfg = pk.TrainConfig(lr=5e-2, max_steps=8, batch_size=4, progress=False)

    def last(rpo_alpha: float) -> dict[str, float]:
        model = tiny_model("llama")[0]
        pk.attach(model, pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), seed=0)
        return pk.train_preference(model, pairs, cfg, beta=0.5,
                                   rpo_alpha=rpo_alpha).report["dpo_trace"][-1]

    plain, rpo = last(0.0), last(1.0)
    assert rpo["chosen_token_logp"] > rpo["ref_chosen_token_logp"]
    assert rpo["chosen_token_logp"] > plain["chosen_token_logp"]
    assert rpo["chosen"] - rpo["rejected"] > 0  # still a preference, not only SFT
