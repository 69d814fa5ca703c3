"""What a server or a client process holds: the model with its adapter(s), the task, the partition.

Built once per process and role (a simulation worker serves many virtual clients in turn, so it
keeps one model and swaps adapter tensors per message). Every process computes the same seeded
partition from the recipe alone, so no data ever travels.

Adapters: "shared" is the federated delta (for a head task it includes the new head, trained in
full); with `fed.personal`, "local" is a private delta of the same method (without the head)
that never leaves its client.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from petkit.core.errors import ConfigError
from petkit.data import split_validation
from petkit.fed.config import FedRecipe
from petkit.fed.partition import ClientShare, labels_of, partition
from petkit.fed.payload import State, state_of
from petkit.training.config import TrainConfig
from petkit.training.evaluate import evaluate
from petkit.app.pipeline import Prepared, encode_examples, method_config, prepare
from petkit.core.model import activate, attach

SHARED, LOCAL = "shared", "local"
Examples = list[dict[str, Any]]
_CACHE: dict[tuple[str, str], Workspace] = {}


@dataclass
class Workspace:
    """A loaded model (adapters attached), the raw training pool and its client shares."""

    recipe: FedRecipe
    prep: Prepared
    task: Any
    pool: Examples
    shares: list[ClientShare]
    full_model_bytes: int
    local_init: State | None = None
    _client_data: dict[int, tuple[Examples, Examples]] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        """The model carrying the adapters."""
        return self.prep.model

    def client_data(self, pid: int) -> tuple[Examples, Examples]:
        """(train, test) encoded examples of client `pid`: its share, split stratified."""
        if pid not in self._client_data:
            fed = self.recipe.fed
            raw = [self.pool[i] for i in self.shares[pid].indices]
            train_raw, test_raw = split_validation(raw, fed.client_test_fraction, fed.seed + pid)
            self._client_data[pid] = (self._encode(train_raw), by_length(self._encode(test_raw)))
        return self._client_data[pid]

    def _encode(self, examples: Examples) -> Examples:
        return encode_examples(examples, self.prep, self.task, self.recipe.recipe.data.max_length)

    def evaluate(self, data: Examples) -> dict[str, float]:
        """Loss (and accuracy) of the model as it is on encoded `data`."""
        train = self.recipe.recipe.train
        return evaluate(self.model, data, batch_size=train.eval_batch_size or 32,
                        pad_id=self.prep.pad_id, label_token_ids=self.prep.label_token_ids,
                        precision=train.runtime.precision)

    def local_config(self, round_: int, pid: int) -> TrainConfig:
        """The recipe's train section as one client's local training for `round_`."""
        seed = self.recipe.fed.seed * 1_000_003 + round_ * 1009 + pid
        return self.recipe.recipe.train.replace(
            output_dir=None, resume=False, save_every=0, eval_every=0, early_stopping_patience=None,
            progress=False, seed=seed, label_token_ids=self.prep.label_token_ids)


def by_length(examples: Examples) -> Examples:
    """Evaluation order: similar lengths share a batch (less padding)."""
    return sorted(examples, key=lambda e: len(e["input_ids"]))


def workspace(recipe: FedRecipe, role: str) -> Workspace:
    """The cached workspace of this process for `recipe` and `role` ("server" | "client")."""
    key = (recipe.to_yaml(), role)
    if key not in _CACHE:
        _CACHE.clear()  # one model per process: a new recipe replaces the old one
        _CACHE[key] = build_workspace(recipe, role)
    return _CACHE[key]


def build_workspace(recipe: FedRecipe, role: str) -> Workspace:
    """A fresh workspace (not cached): model loaded, adapters attached, shares computed."""
    data = recipe.recipe.data
    # Clients never read the server's test split: they get a one-example stub of it.
    test_size = data.test_size if role == "server" else 1
    local = dataclasses.replace(recipe.recipe, data=dataclasses.replace(
        data, validation_size=0, test_size=test_size))
    prep, task = prepare(local, with_train=False)
    pool = list(task.train)
    if data.train_size is not None and data.train_size < len(pool):
        pool = random.Random(recipe.recipe.train.seed).sample(pool, data.train_size)
    fed = recipe.fed
    shares = partition(labels_of(pool), len(pool), fed.clients, fed.partition, fed.alpha, fed.seed,
                       min_size=2)
    full = sum(p.numel() * p.element_size() for p in prep.model.parameters())
    ws = Workspace(recipe, prep, task, pool, shares, full)
    shared = method_config(recipe.recipe, prep)
    attach(prep.model, shared, name=SHARED)
    if fed.personal and role == "client":
        attach(prep.model, dataclasses.replace(shared, modules_to_save=()), name=LOCAL)
        ws.local_init = state_of(prep.model, LOCAL)
        activate(prep.model, [SHARED])
    return ws


def partition_id(node_config: dict[str, Any], recipe: FedRecipe) -> int:
    """This node's partition id from Flower's node config, checked against `fed.clients`."""
    pid = node_config.get("partition-id")
    parts = node_config.get("num-partitions", recipe.fed.clients)
    if not isinstance(pid, int) or not 0 <= pid < recipe.fed.clients:
        raise ConfigError(f"node config partition-id={pid!r} must be an int in [0, {recipe.fed.clients})"
                          " (flower-supernode --node-config 'partition-id=0 num-partitions=N')")
    if parts != recipe.fed.clients:
        raise ConfigError(f"node config num-partitions={parts} but fed.clients={recipe.fed.clients}")
    return pid
