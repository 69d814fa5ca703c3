"""Compressed federated updates: int8 / top-k codecs, error feedback, rejection, end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from petkit.core.errors import ConfigError
from petkit.fed.compress import Compression, decode, encode
from petkit.fed.config import FedConfig


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"l1.lora_B": rng.normal(size=(16, 4)).astype(np.float32),
            "l0.lora_A": rng.normal(size=(4, 16)).astype(np.float32) * 1e-3,  # small scale of its own
            "head.bias": rng.normal(size=(5,)).astype(np.float32)}


@pytest.mark.parametrize("text", ["int8", "topk:0.1", "topk:1"])
def test_what_is_sent_plus_what_is_kept_is_exactly_the_update(text: str) -> None:
    update, how = _update(), Compression.parse(text)
    sent, dropped = encode(update, how)
    decoded = decode(sent, {k: v.shape for k, v in update.items()}, how)
    for key in update:
        np.testing.assert_allclose(decoded[key] + dropped[key], update[key], rtol=0, atol=1e-7)


def test_int8_error_is_bounded_per_tensor_and_top_k_keeps_the_largest() -> None:
    update = _update()
    shapes = {k: v.shape for k, v in update.items()}
    int8 = decode(encode(update, Compression.parse("int8"))[0], shapes, Compression.parse("int8"))
    for key, value in update.items():  # half a step of the tensor's own scale, not the global one
        assert np.abs(int8[key] - value).max() <= np.abs(value).max() / 127 / 2 + 1e-9
    how = Compression.parse("topk:0.25")
    sent, _ = encode(update, how)
    topk = decode(sent, shapes, how)
    for key, value in update.items():
        kept = topk[key] != 0
        assert kept.sum() == max(1, round(0.25 * value.size))
        assert np.abs(value[kept]).min() >= np.abs(value[~kept]).max()


def wire_bytes(sent: dict[str, np.ndarray]) -> int:
    return sum(int(v.nbytes) for v in sent.values())


def test_bytes_on_the_wire() -> None:
    update = _update()
    dense = sum(v.nbytes for v in update.values())
    params = sum(v.size for v in update.values())
    assert wire_bytes(encode(update, Compression.parse("int8"))[0]) == params + 4 * len(update)
    k = sum(max(1, round(0.1 * v.size)) for v in update.values())
    assert wire_bytes(encode(update, Compression.parse("topk:0.1"))[0]) == 6 * k < dense / 6


def test_error_feedback_delivers_a_constant_update_in_full_over_rounds() -> None:
    """Sending u every round through top-k with feedback: the sum received tracks n * u."""
    how, update = Compression.parse("topk:0.1"), _update()
    shapes = {k: v.shape for k, v in update.items()}
    residual = {k: np.zeros_like(v) for k, v in update.items()}
    received = {k: np.zeros_like(v) for k, v in update.items()}
    rounds = 40
    for _ in range(rounds):
        sent, residual = encode({k: update[k] + residual[k] for k in update}, how)
        for key, value in decode(sent, shapes, how).items():
            received[key] += value
    for key in update:  # what is still owed is the residual, which stays bounded
        np.testing.assert_allclose(received[key] + residual[key], rounds * update[key], rtol=1e-4, atol=1e-4)
        assert np.abs(residual[key]).max() < 12 * np.abs(update[key]).max()


@pytest.mark.parametrize("text", ["int4", "topk", "topk:0", "topk:1.5", "topk:x"])
def test_bad_compress_setting_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="fed.compress"):
        FedConfig(compress=text)


def test_malformed_compressed_updates_are_rejected_by_the_strategy() -> None:
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from petkit.fed.payload import Spec, from_record, to_record
    from petkit.fed.strategy import PetStrategy

    glob = {"a.lora_A": np.ones((2, 3), np.float32), "a.lora_B": np.zeros((3, 2), np.float32)}
    strategy = PetStrategy(FedConfig(clients=3, fraction=1.0, compress="int8"), Spec.of(glob), 1000)
    strategy.reference = glob

    def reply(node: int, arrays: dict) -> Message:
        meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
        content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 4})})
        return Message(content, metadata=meta)

    good, _ = encode({k: np.full_like(v, 0.5) for k, v in glob.items()}, Compression.parse("int8"))
    replies = [reply(1, good), reply(2, {**good, "int8-scales": np.array([np.inf, 1], np.float32)}),
               reply(3, {"int8-values": good["int8-values"]})]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    np.testing.assert_allclose(out["a.lora_A"], 1.5, atol=1e-6)  # global + the decoded update
    np.testing.assert_allclose(out["a.lora_B"], 0.5, atol=1e-6)
    reasons = {r["node"]: r["reason"] for r in strategy.row(1)["rejected"]}
    assert set(reasons) == {2, 3} and all("compressed update" in r for r in reasons.values())


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from test_fed import tiny_bert

    return tiny_bert.__wrapped__(tmp_path_factory)  # the same tiny BERT folder test_fed uses


@pytest.mark.slow
def test_compressed_simulation_sends_fewer_bytes_both_ways(tiny_bert_folder: str, tmp_path: Path) -> None:
    from test_fed import _recipe

    from petkit.fed import run_simulation

    report = run_simulation(_recipe(tiny_bert_folder, tmp_path / "run", clients=2, rounds=2,
                                    compress="topk:0.1", compress_down="int8", workers=1))
    rows = report["rounds"][1:]
    for row in rows:  # down: int8 of the global delta (a quarter of it, plus headers)
        assert row["bytes_down"] < row["sampled"] * report["delta_bytes"] / 3
    assert all(sorted(row["accepted"]) == [0, 1] for row in rows)
    for row in rows:  # up: top-10% indices + float16 values
        assert row["bytes_up"] < row["sampled"] * report["delta_bytes"] / 5
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


def test_compress_none_from_the_command_line_means_no_compression() -> None:
    from petkit.fed.config import apply_fed_overrides, load_fed_recipe

    recipe = apply_fed_overrides(load_fed_recipe("minilm-bbc-noniid"), {"fed.compress": "none"})
    assert not recipe.fed.compression.active
    recipe = apply_fed_overrides(recipe, {"fed.compress": "topk:0.05"})
    assert recipe.fed.compression == Compression("topk", 0.05)


def test_int8_broadcast_keeps_the_server_global_exact() -> None:
    """Clients train from the dequantised global; the server adds their updates to the exact one."""
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from petkit.fed.payload import Spec, from_record, to_record
    from petkit.fed.strategy import PetStrategy

    rng = np.random.default_rng(3)
    glob = {"a.lora_A": rng.normal(size=(2, 3)).astype(np.float32), "a.lora_B": rng.normal(size=(3, 2)).astype(np.float32)}
    shapes = {k: v.shape for k, v in glob.items()}
    for up in ("none", "int8"):
        fed = FedConfig(clients=1, fraction=1.0, compress=up, compress_down="int8")
        strategy = PetStrategy(fed, Spec.of(glob), 1000)
        strategy.reference = glob
        sent = strategy._broadcast(to_record(glob))
        assert set(sent) == {"int8-values", "int8-scales"}
        received = decode(from_record(sent), shapes, Compression("int8"))
        assert 0 < max(np.abs(received[k] - glob[k]).max() for k in glob) < 0.05
        local = {k: received[k] + 0.25 for k in glob}  # the client's training moved every entry by 0.25
        reply_state = local if up == "none" else encode({k: local[k] - received[k] for k in glob},
                                                         Compression("int8"))[0]
        meta = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=0, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
        content = RecordDict({"arrays": to_record(reply_state), "metrics": MetricRecord({"num-examples": 4})})
        arrays, _ = strategy.aggregate_train(1, [Message(content, metadata=meta)])
        out = from_record(arrays)
        for key in glob:  # exact global + 0.25, not the dequantised global + 0.25
            np.testing.assert_allclose(out[key], glob[key] + 0.25, atol=1e-6)


def test_top_k_broadcast_is_refused() -> None:
    with pytest.raises(ConfigError, match="compress_down"):
        FedConfig(compress_down="topk:0.5")
