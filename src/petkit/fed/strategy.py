"""`PetStrategy`: Flower's FedAvg strategy (its `start` loop, messages and records) with what a
delta federation needs on top:

- seeded client sampling per round (among all N clients, once they are connected);
- every training reply checked against the global adapter's keys, shapes, dtypes and for finite
  values; a crashed, malformed or wrongly shaped update is rejected with a logged reason and the
  round is aggregated from the others (nothing of it reaches the global adapter);
- FedAvg weighted by examples, FedProx (clients get `proximal-mu`, as Flower's FedProx sends it),
  or DP-FedAvg (clipping + Gaussian noise, epsilon from the accountant);
- per-round rows: bytes down/up vs full-model FedAvg, accepted/rejected, per-client metrics.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from petkit.fed.aggregate import dp_average, weighted_average
from petkit.fed.compress import decode, encode
from petkit.fed.config import FedConfig
from petkit.fed.payload import (RejectedUpdate, Spec, State, check_reply, from_record, record_bytes,
                                short_reason, to_record)
from petkit.fed.privacy import PrivacyAccountant

LOG = logging.getLogger("petkit.fed")
WAIT_S = 0.5


class PetStrategy(FedAvg):
    """FedAvg/FedProx/DP-FedAvg over petkit adapter deltas, with validation and accounting."""

    def __init__(self, fed: FedConfig, spec: Spec, full_model_bytes: int) -> None:
        """`spec`: what a valid update looks like; `full_model_bytes`: one full model's size."""
        super().__init__(fraction_train=fed.fraction, fraction_evaluate=fed.fraction_evaluate,
                         min_train_nodes=fed.sampled, min_evaluate_nodes=fed.evaluated,
                         min_available_nodes=fed.clients)
        self.fed, self.spec, self.full_model_bytes = fed, spec, full_model_bytes
        self.noise_rng = np.random.default_rng(fed.dp_seed)
        self.accountant = (PrivacyAccountant(fed.clients, fed.sampled, fed.dp_noise, fed.dp_delta)
                           if fed.dp_clip is not None else None)
        self.rows: dict[int, dict[str, Any]] = {}
        self.reference: State = {}

    def row(self, server_round: int) -> dict[str, Any]:
        """The metrics row of a round (created on first use)."""
        return self.rows.setdefault(server_round, {
            "round": server_round, "started": time.time(), "sampled": 0, "accepted": [],
            "rejected": [], "bytes_down": 0, "bytes_up": 0, "bytes_down_eval": 0,
            "full_model_bytes": 0, "clients": {}})

    def _sample(self, grid: Grid, k: int, server_round: int, salt: int) -> list[int]:
        deadline = time.time() + self.fed.timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.fed.clients:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(nodes)} of fed.clients={self.fed.clients} clients "
                                   f"connected within {self.fed.timeout:.0f}s")
            time.sleep(WAIT_S)
        rng = random.Random(self.fed.seed * 1_000_003 + server_round * 2 + salt)
        return rng.sample(nodes, min(k, len(nodes)))

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int],
                  kind: str) -> list[Message]:
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=kind, dst_node_id=n) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients; send the global delta with the round and the proximal weight."""
        nodes = self._sample(grid, self.fed.sampled, server_round, 0)
        self.reference = from_record(arrays)
        arrays = self._broadcast(arrays)
        config["server-round"] = server_round
        config["proximal-mu"] = self.fed.proximal
        row = self.row(server_round)
        row["sampled"] = len(nodes)
        row["bytes_down"] += record_bytes(arrays) * len(nodes)
        row["full_model_bytes"] += 2 * self.full_model_bytes * len(nodes)
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, reject bad ones (logged), aggregate the rest."""
        row = self.row(server_round)
        states, weights, losses = [], [], []
        decoder = self._decoder()  # once a round: it may re-encode the broadcast
        for msg in replies:
            node = msg.metadata.src_node_id
            row["bytes_up"] += _reply_bytes(msg)
            try:
                state, n = check_reply(msg, self.spec, self.arrayrecord_key, decoder)
            except RejectedUpdate as why:
                pid = _claimed_partition(msg)
                LOG.warning("round %d: rejected the update of node %d%s: %s", server_round, node,
                            "" if pid is None else f" (partition {pid})", why)
                row["rejected"].append({"node": node, "partition": pid, "reason": str(why)})
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            row["accepted"].append(int(metrics.get("partition-id", -1)))
            states.append(state)
            weights.append(n)
            losses.append(float(metrics.get("train-loss", float("nan"))))
        loss = _loss_record(losses, weights)
        if loss is not None:
            row["train_loss"] = loss["train-loss"]
        if self.accountant is not None:
            return self._dp_aggregate(server_round, states), loss
        if not states:
            LOG.warning("round %d: no update accepted; the global adapter is unchanged", server_round)
            return None, loss
        return to_record(weighted_average(states, weights)), loss

    def _broadcast(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global delta as sent: as is, or int8 (`fed.compress_down`)."""
        how = self.fed.broadcast
        return to_record(encode(from_record(arrays), how)[0]) if how.active else arrays

    def _decoder(self) -> Callable[[State], State] | None:
        """Replies -> the client's delta on the server's exact global: exact + the client's update.

        The update is what the client changed relative to the global it *received*: decoded from
        a compressed reply, or its delta minus the dequantised broadcast (`compress_down`).
        Adding it to the exact global keeps the broadcast's quantisation error out of the
        server's state (it is not baked in round after round).
        """
        up, down = self.fed.compression, self.fed.broadcast
        if not (up.active or down.active):
            return None
        ref, shapes = self.reference, self.spec.shapes
        received = decode(encode(ref, down)[0], shapes, down) if down.active else ref

        def delta(reply: State) -> State:
            update = (decode(reply, shapes, up) if up.active
                      else {k: reply[k].astype(np.float32) - received[k] for k in ref})
            return {k: (ref[k].astype(np.float32) + update[k]).astype(ref[k].dtype) for k in ref}

        return delta

    def _dp_aggregate(self, server_round: int, states: list[State]) -> ArrayRecord:
        assert self.accountant is not None and self.fed.dp_clip is not None
        new, norms = dp_average(states, self.reference, self.fed.dp_clip, self.fed.dp_noise,
                                self.fed.sampled, self.noise_rng)
        row = self.row(server_round)
        row["update_norms"] = norms
        row["epsilon"] = self.accountant.step()
        return to_record(new)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample clients to evaluate the global delta on their own held-out splits."""
        if self.fed.evaluated == 0:
            return []
        nodes = self._sample(grid, self.fed.evaluated, server_round, 1)
        arrays = self._broadcast(arrays)
        config["server-round"] = server_round
        row = self.row(server_round)
        row["bytes_down_eval"] += record_bytes(arrays) * len(nodes)
        row["full_model_bytes"] += self.full_model_bytes * len(nodes)
        return self._messages(arrays, config, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client metrics into the round's row; their example-weighted means returned."""
        row = self.row(server_round)
        for msg in replies:
            if msg.has_error():
                LOG.warning("round %d: evaluation failed on node %d: %s", server_round,
                            msg.metadata.src_node_id, short_reason(msg.error.reason))
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            row["clients"][int(metrics.pop("partition-id", -1))] = metrics
        means = client_means(row["clients"])
        row.update({f"client_{k}": v for k, v in means.items()})
        return MetricRecord(means) if means else None


def client_means(clients: dict[int, dict[str, float]]) -> dict[str, float]:
    """Example-weighted mean of each metric over the clients' evaluations."""
    if not clients:
        return {}
    weights = {pid: float(m.get("num-examples", 1)) for pid, m in clients.items()}
    keys = {k for m in clients.values() for k in m if k != "num-examples"}
    total = sum(weights.values())
    return {k: sum(weights[p] * float(m[k]) for p, m in clients.items() if k in m) / total
            for k in sorted(keys)}


def _claimed_partition(msg: Message) -> int | None:
    """The partition id a reply says it comes from (None for an error reply)."""
    if msg.has_error():
        return None
    for record in msg.content.metric_records.values():
        value = record.get("partition-id")
        if isinstance(value, int):
            return value
    return None


def _reply_bytes(msg: Message) -> int:
    if msg.has_error():
        return 0
    try:
        return sum(record_bytes(r) for r in msg.content.array_records.values())
    except Exception:  # noqa: BLE001 - a malformed record still counts as received, size unknown
        return 0


def _loss_record(losses: list[float], weights: list[float]) -> MetricRecord | None:
    pairs = [(l, w) for l, w in zip(losses, weights) if np.isfinite(l)]
    if not pairs:
        return None
    return MetricRecord({"train-loss": sum(l * w for l, w in pairs) / sum(w for _, w in pairs)})
