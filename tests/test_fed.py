"""Federated PET on Flower: aggregation math, FedProx, partitions, DP, update rejection, a 2-round
simulation and a multi-process localhost deployment (SuperLink + 2 SuperNodes), on a tiny BERT."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.fed import FedConfig, fed_recipe_from_dict, load_fed_recipe, partition, weighted_average
from petkit.fed.aggregate import dp_average
from petkit.fed.config import apply_fed_overrides, shipped_fed_recipes
from petkit.fed.privacy import PrivacyAccountant
from petkit.fed.prox import proximal, proximal_penalty

sys.path.insert(0, str(Path(__file__).parent))
from test_quiet import LogLines  # noqa: E402
from toys import save_tiny_bert  # noqa: E402

flwr = pytest.importorskip("flwr")


# ---------------------------------------------------------------- aggregation, FedProx, DP math

def test_weighted_fedavg_equals_the_hand_computed_average() -> None:
    a = {"x": np.array([1.0, 2.0], np.float32), "y": np.array([[1.0]], np.float32)}
    b = {"x": np.array([3.0, 6.0], np.float32), "y": np.array([[5.0]], np.float32)}
    out = weighted_average([a, b], [1, 3])  # (1*a + 3*b) / 4
    np.testing.assert_allclose(out["x"], [2.5, 5.0])
    np.testing.assert_allclose(out["y"], [[4.0]])
    assert out["x"].dtype == np.float32
    with pytest.raises(ValueError, match="weights"):
        weighted_average([a, b], [0, 0])


def test_dp_average_clips_each_update_and_noise_has_the_stated_scale() -> None:
    ref = {"w": np.zeros(2, np.float32)}
    big, small = {"w": np.array([3.0, 4.0], np.float32)}, {"w": np.array([0.3, 0.4], np.float32)}
    out, norms = dp_average([big, small], ref, clip=1.0, noise=0.0, sampled=4, rng=np.random.default_rng(0))
    # big (norm 5) is scaled to norm 1: (0.6, 0.8); small (norm 0.5) is kept; sum / m with m = 4
    np.testing.assert_allclose(out["w"], [(0.6 + 0.3) / 4, (0.8 + 0.4) / 4], rtol=1e-6)
    np.testing.assert_allclose(norms, [5.0, 0.5], rtol=1e-6)
    zero = {"w": np.zeros(200_000, np.float32)}
    noisy, _ = dp_average([zero], zero, clip=2.0, noise=0.5, sampled=4, rng=np.random.default_rng(0))
    assert noisy["w"].std() == pytest.approx(0.5 * 2.0 / 4, rel=0.01)  # z * C / m


def test_accountant_composes_rounds_replace_one_with_half_the_noise_multiplier() -> None:
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = PrivacyAccountant(clients=10, sampled=5, noise=1.2, delta=1e-5)
    eps = [acc.step() for _ in range(3)]
    assert eps[0] < eps[1] < eps[2]
    ref = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    per_round = dpa.SampledWithoutReplacementDpEvent(10, 5, dpa.GaussianDpEvent(0.6))  # z / 2
    ref.compose(dpa.SelfComposedDpEvent(per_round, 3))
    assert eps[2] == pytest.approx(ref.get_epsilon(1e-5))
    more_noise = PrivacyAccountant(clients=10, sampled=5, noise=2.4, delta=1e-5)
    assert [more_noise.step() for _ in range(3)][-1] < eps[2]
    assert PrivacyAccountant(10, 5, 0.0, 1e-5).step() == float("inf")


def test_fedprox_hook_adds_the_gradient_of_the_proximal_term() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pk.attach(model, pk.LoraConfig(r=2, targets=["0", "2"]))
    params = pk.trainable_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    anchor = {k: p.detach() + 0.05 * torch.randn_like(p) for k, p in params.items()}
    x, mu = torch.randn(5, 4), 0.3

    def grads(extra: bool) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(x).pow(2).sum() + (proximal_penalty(params, anchor, mu) if extra else 0)
        loss.backward()
        return [p.grad.clone() for p in params.values()]

    expected = grads(extra=True)
    with proximal(params, anchor, mu):
        hooked = grads(extra=False)
    plain = grads(extra=False)  # hooks are gone after the block
    for e, h, p, (k, w) in zip(expected, hooked, plain, params.items()):
        torch.testing.assert_close(h, e)
        torch.testing.assert_close(h - p, mu * (w.detach() - anchor[k]))


# ---------------------------------------------------------------- partitions and config

def test_partitions_are_disjoint_seeded_and_dirichlet_skews_with_small_alpha() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=400).tolist()
    iid = partition(labels, 400, 8, "iid", 1.0, seed=3)
    assert sorted(i for s in iid for i in s.indices) == list(range(400))
    assert {s.size for s in iid} == {50}
    for s in iid:
        assert list(s.histogram) == [sum(labels[i] == c for i in s.indices) for c in range(4)]

    def classes_per_client(alpha: float) -> float:
        shares = partition(labels, 400, 8, "dirichlet", alpha, seed=3)
        assert sorted(i for s in shares for i in s.indices) == list(range(400))
        assert min(s.size for s in shares) >= 2
        return float(np.mean([sum(c >= 0.1 * s.size for c in s.histogram) for s in shares]))

    assert classes_per_client(0.1) < classes_per_client(100.0) == 4.0
    again = partition(labels, 400, 8, "dirichlet", 0.1, seed=3)
    assert [s.indices for s in again] == [s.indices for s in partition(labels, 400, 8, "dirichlet", 0.1, 3)]
    with pytest.raises(ConfigError, match="labelled"):
        partition(None, 400, 8, "dirichlet", 0.5, 0)
    with pytest.raises(ConfigError, match="fed.clients"):
        partition(labels[:10], 10, 8, "iid", 0.5, 0)


@pytest.mark.parametrize("field,value,match", [
    ("clients", 0, "fed.clients"), ("fraction", 0.0, "fed.fraction"), ("alpha", -1.0, "fed.alpha"),
    ("strategy", "fedsgd", "fed.strategy"), ("dp_noise", 1.0, "dp_clip"),
    ("faults", {12: "crash"}, "partition id"), ("faults", {0: "explode"}, "faults"),
])
def test_bad_fed_config_names_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FedConfig(**{field: value})


def test_shipped_fed_recipe_loads_round_trips_and_takes_overrides() -> None:
    assert "minilm-bbc-noniid" in shipped_fed_recipes()
    recipe = load_fed_recipe("minilm-bbc-noniid")
    assert recipe.fed.clients == 10 and recipe.fed.partition == "dirichlet"
    assert recipe.recipe.method_config().method == "lora"
    assert fed_recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    changed = apply_fed_overrides(recipe, {"fed.alpha": "0.1", "fed.personal": "true", "train.lr": "1e-3"})
    assert changed.fed.alpha == 0.1 and changed.fed.personal and changed.recipe.train.lr == 1e-3
    with pytest.raises(ConfigError, match="fed.nope"):
        apply_fed_overrides(recipe, {"fed.nope": "1"})


def test_cli_flags_reach_the_recipe() -> None:
    from petkit.cli import build_parser
    from petkit.fed.cli import fed_recipe

    args, extra = build_parser().parse_known_args(
        ["fed", "--clients", "4", "--rounds", "3", "--alpha", "0.2", "--strategy", "fedprox", "--mu", "0.1",
         "--dp-clip", "1", "--dp-noise", "0.7", "--personal", "--fed.fraction_evaluate=0.5"])
    recipe = fed_recipe(args, {"fed.fraction_evaluate": "0.5"})
    fed = recipe.fed
    assert (fed.clients, fed.rounds, fed.alpha, fed.strategy, fed.proximal) == (4, 3, 0.2, "fedprox", 0.1)
    assert (fed.dp_clip, fed.dp_noise, fed.personal, fed.fraction_evaluate) == (1.0, 0.7, True, 0.5)


# ---------------------------------------------------------------- rejection inside the strategy

def _reply(node: int, content: object) -> "flwr.app.Message":
    from flwr.app import Message, Metadata

    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                    group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


def test_bad_updates_are_rejected_with_reasons_and_never_reach_the_global_adapter(
        caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict

    from petkit.fed.payload import Spec, from_record, to_record
    from petkit.fed.strategy import PetStrategy

    glob = {"a.lora_A": np.zeros((2, 3), np.float32), "a.lora_B": np.zeros((3, 2), np.float32)}
    strategy = PetStrategy(FedConfig(clients=6, fraction=1.0), Spec.of(glob), full_model_bytes=1000)
    strategy.reference = glob

    def content(state: dict, n: object = 10) -> RecordDict:
        return RecordDict({"arrays": to_record(state), "metrics": MetricRecord({"num-examples": n})})

    good1 = {k: np.full_like(v, 1.0) for k, v in glob.items()}
    good2 = {k: np.full_like(v, 4.0) for k, v in glob.items()}
    malformed = to_record(good1)
    malformed["a.lora_A"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"junk")
    replies = [
        _reply(1, content(good1, 30)), _reply(2, content(good2, 10)),
        _reply(3, Error(code=0, reason="ClientAppException: injected crash")),
        _reply(4, RecordDict({"arrays": malformed, "metrics": MetricRecord({"num-examples": 5})})),
        _reply(5, content({**good1, "a.lora_A": np.zeros((3, 3), np.float32)})),
        _reply(6, content({**good1, "a.lora_B": np.full((3, 2), np.nan, np.float32)})),
        _reply(7, content(good1, 0)),
        _reply(8, content({"other": np.zeros(1, np.float32)})),
    ]
    with caplog.at_level("WARNING", logger="petkit.fed"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    for key in glob:  # (30 * 1 + 10 * 4) / 40: only the two good updates
        np.testing.assert_allclose(out[key], 1.75)
    reasons = {r["node"]: r["reason"] for r in strategy.row(1)["rejected"]}
    assert set(reasons) == {3, 4, 5, 6, 7, 8}
    assert "crash" in reasons[3] and "malformed" in reasons[4] and "shape (3, 3)" in reasons[5]
    assert "NaN" in reasons[6] and "num-examples" in reasons[7] and "missing" in reasons[8]
    assert sum("rejected the update" in r.message for r in caplog.records) == 6
    only_bad, _ = strategy.aggregate_train(2, replies[2:])
    assert only_bad is None  # the round completes; Flower keeps the previous global adapter


# ---------------------------------------------------------------- end to end on a tiny BERT

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _recipe(model: str, out: Path, clients: int, rounds: int, **fed: object) -> "petkit.fed.FedRecipe":
    return fed_recipe_from_dict({
        "method": {"name": "lora", "r": 2, "targets": ["query", "value"]},
        "model": {"name": model},
        "data": {"name": "bbc-news", "task_type": "head", "train_size": 30 * clients, "test_size": 20,
                 "max_length": 48},
        "train": {"lr": 5e-3, "max_steps": 2, "batch_size": 8, "output_dir": str(out)},
        "fed": {"clients": clients, "rounds": rounds, "fraction": 1.0, "timeout": 600, **fed},
    })


def _check_report(report: dict, clients: int, rounds: int) -> None:
    rows = report["rounds"]
    assert [r["round"] for r in rows] == list(range(rounds + 1))  # round 0: the untuned model
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert sum(p["examples"] for p in report["partition"]) == 30 * clients
    for row in rows[1:]:
        assert row["bytes_down"] == row["sampled"] * report["delta_bytes"]
        assert row["bytes_down_eval"] == clients * report["delta_bytes"]
        assert row["full_model_bytes"] == (2 * row["sampled"] + clients) * report["full_model_bytes"]
        assert set(row["clients"]) == {str(c) for c in range(clients)}
    assert report["totals"]["saving_factor"] > 100


@pytest.mark.slow
def test_two_round_simulation_end_to_end_with_faulty_clients(
        tiny_bert: str, tmp_path: Path, recwarn: pytest.WarningsRecorder,
        capfd: pytest.CaptureFixture[str]) -> None:
    from petkit.fed import run_simulation

    faults = {1: "crash", 2: "wrong-shape", 3: "malformed"}
    recipe = _recipe(tiny_bert, tmp_path / "run", clients=4, rounds=2, strategy="fedprox", proximal_mu=0.1,
                     personal=True, dp_clip=1.0, dp_noise=0.5, dp_seed=0, faults=faults, workers=2)
    flower = LogLines()
    logging.getLogger("flwr").addHandler(flower)
    try:
        report = run_simulation(recipe)
    finally:
        logging.getLogger("flwr").removeHandler(flower)
    # quiet by default: no Flower banner, no Ray tip
    assert not [m for m in flower.lines if "DEPRECATED" in m], flower.lines
    assert not [w for w in recwarn if "Ray will no longer" in str(w.message)]
    _check_report(report, clients=4, rounds=2)
    bar = capfd.readouterr().err  # a progress bar over the rounds, with the test metrics
    assert "fed: 100%" in bar and "2/2" in bar and "accuracy=" in bar, bar[-500:]
    acc = PrivacyAccountant(4, 4, 0.5, 1e-5)
    for row in report["rounds"][1:]:
        assert row["accepted"] == [0]
        reasons = sorted(r["reason"] for r in row["rejected"])
        assert reasons[0].startswith("client failed") and "injected crash" in reasons[0]
        assert reasons[1].startswith("malformed arrays")
        assert "has shape (3, 32), expected (2, 32)" in reasons[2]
        assert row["bytes_up"] > 0 and "client_personal-accuracy" in row
        assert row["epsilon"] == pytest.approx(acc.step())
    out = tmp_path / "run"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "accuracy.png").stat().st_size > 0
    from petkit.models import load_model

    model, _ = load_model(tiny_bert, task="seq-cls", num_labels=5)
    with warnings.catch_warnings():  # the new head's random base weights differ: fingerprint warning
        warnings.simplefilter("ignore")
        pk.load_adapter(model, out / "adapter", strict=False)  # an ordinary petkit adapter folder
    assert pk.active_adapters(model) == ["shared"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


@pytest.mark.slow
def test_multi_process_localhost_deployment_end_to_end(tiny_bert: str, tmp_path: Path) -> None:
    """flower-superlink + 2 flower-supernode processes; `flwr run` submits the petkit app."""
    from petkit.fed import run_deployment

    bin_dir = Path(sys.executable).parent
    # the SuperLink starts `flower-superexec` by name: the venv's bin must be on PATH (CI runs
    # .venv/bin/python without activating the venv)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = _free_port()
    commands = [[str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                 "--port", str(port)]]
    commands += [[str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2"]
                 for i in range(2)]
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = open(tmp_path / f"proc{i}.log", "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        _wait_for_port(port, 120, procs[0], tmp_path / "proc0.log")
        recipe = _recipe(tiny_bert, tmp_path / "run", clients=2, rounds=1)
        report = run_deployment(recipe, f"127.0.0.1:{port}", echo=lambda line: None, timeout=600)
    finally:
        for proc in procs:  # each started its own session: end it and its children
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    _check_report(report, clients=2, rounds=1)
    assert sorted(report["rounds"][1]["accepted"]) == [0, 1]
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
