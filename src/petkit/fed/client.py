"""The Flower `ClientApp`: local training and evaluation of the shared delta on one client's data.

train:    global delta in -> load into "shared" (+ this client's private "local", kept in the
          node's Flower `Context.state`) -> `petkit.training` for `train.max_steps` local steps
          (FedProx adds its proximal gradient) -> the shared delta out, with num-examples.
evaluate: global delta in -> accuracy/loss on the client's own held-out split, with the shared
          adapter alone and, with personalisation, shared + local together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from petkit.app.safe_yaml import load_yaml
from petkit.core.io import adapter_state
from petkit.fed.compress import decode, encode
from petkit.fed.config import FedRecipe, fed_recipe_from_dict
from petkit.fed.payload import State, from_record, load_into, state_of, to_record
from petkit.fed.prox import proximal
from petkit.fed.workspace import LOCAL, SHARED, Workspace, partition_id, workspace
from petkit.training.loop import train
from petkit.core.errors import ConfigError
from petkit.core.model import activate

LOCAL_STATE = "petkit-local"
RESIDUAL_STATE = "petkit-residual"  # error feedback of compressed updates
RECIPE_KEY = "recipe-yaml"


def recipe_from_context(context: Context) -> FedRecipe:
    """The federated recipe a deployment run carries in its run config (`recipe-yaml`)."""
    text = context.run_config.get(RECIPE_KEY)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"run config has no {RECIPE_KEY!r}: start runs with `petkit fed --deploy`")
    return fed_recipe_from_dict(load_yaml(text, f"run config {RECIPE_KEY!r}"))


def _local_state(ws: Workspace, context: Context) -> State:
    record = context.state.array_records.get(LOCAL_STATE)
    if record is not None:
        return from_record(record)
    assert ws.local_init is not None
    return ws.local_init


def _use(ws: Workspace, msg: Message, context: Context, personal: bool) -> State:
    """Load the message's global delta (and the private one) and activate them; return the global."""
    glob = from_record(msg.content["arrays"])
    how = ws.recipe.fed.broadcast
    if how.active:  # the int8 global delta: decode against this client's own adapter's shapes
        shapes = {k: tuple(v.shape) for k, v in adapter_state(ws.model, SHARED).items()}
        glob = decode(glob, shapes, how)
    load_into(ws.model, SHARED, glob)
    names = [SHARED]
    if personal:
        load_into(ws.model, LOCAL, _local_state(ws, context))
        names.append(LOCAL)
    activate(ws.model, names)
    return glob


def client_train(msg: Message, context: Context, recipe: FedRecipe) -> Message:
    """One round of local training; replies with the shared delta and num-examples."""
    ws = workspace(recipe, "client")
    pid = partition_id(dict(context.node_config), recipe)
    fault = recipe.fed.faults.get(pid)
    if fault == "crash":
        raise RuntimeError(f"client {pid}: injected crash (fed.faults)")
    data, _ = ws.client_data(pid)
    glob = _use(ws, msg, context, recipe.fed.personal)
    config = msg.content["config"]
    round_, mu = int(config.get("server-round", 0)), float(config.get("proximal-mu", 0.0))
    cfg = ws.local_config(round_, pid)
    anchor = {k: torch.from_numpy(v) for k, v in glob.items()}
    with proximal(adapter_state(ws.model, SHARED), anchor, mu, cfg.grad_accum):
        result = train(ws.model, data, cfg, pad_id=ws.prep.pad_id)
    if recipe.fed.personal:
        context.state[LOCAL_STATE] = to_record(state_of(ws.model, LOCAL))
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    metrics = {"num-examples": len(data), "train-loss": float(np.mean(losses)) if losses else 0.0,
               "partition-id": pid}
    arrays = _faulty(_outgoing(state_of(ws.model, SHARED), glob, context, recipe), fault)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def _outgoing(local: State, glob: State, context: Context, recipe: FedRecipe) -> State:
    """What the client sends: its delta, or its compressed update with error feedback."""
    how = recipe.fed.compression
    if not how.active:
        return local
    record = context.state.array_records.get(RESIDUAL_STATE)
    residual = from_record(record) if record is not None else {}
    update = {k: local[k].astype(np.float32) - glob[k] + residual.get(k, 0.0) for k in local}
    sent, dropped = encode(update, how)
    context.state[RESIDUAL_STATE] = to_record(dropped)
    return sent


def _faulty(state: State, fault: str | None) -> ArrayRecord:
    """The honest record, or the misbehaviour `fed.faults` asks this client for."""
    if fault == "malformed":
        key = next(iter(state))
        record = to_record(state)
        record[key] = Array(dtype="float32", shape=state[key].shape, stype="numpy.ndarray",
                            data=b"not a numpy array")
        return record
    if fault == "wrong-shape":
        key = next(iter(state))
        state = {**state, key: np.zeros((state[key].shape[0] + 1, *state[key].shape[1:]), state[key].dtype)}
    if fault == "nan":
        key = next(k for k, v in state.items() if np.issubdtype(v.dtype, np.floating))
        state = {**state, key: np.full_like(state[key], np.nan)}
    return to_record(state)


def client_evaluate(msg: Message, context: Context, recipe: FedRecipe) -> Message:
    """Metrics of the global delta (and shared + local) on this client's held-out split."""
    ws = workspace(recipe, "client")
    pid = partition_id(dict(context.node_config), recipe)
    _, test = ws.client_data(pid)
    _use(ws, msg, context, False)
    metrics: dict[str, Any] = {"num-examples": len(test), "partition-id": pid, **ws.evaluate(test)}
    if recipe.fed.personal:
        _use(ws, msg, context, True)
        metrics.update({f"personal-{k}": v for k, v in ws.evaluate(test).items()})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(recipe: FedRecipe | None = None) -> ClientApp:
    """A ClientApp for `recipe`; None reads the recipe from the run config (deployment)."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, recipe or recipe_from_context(context))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, recipe or recipe_from_context(context))

    return app
