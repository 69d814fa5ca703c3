"""serve.prefill_graphs: one-row prefills replayed from CUDA graphs give the eager engine's tokens
for the base and every resident adapter, are captured again when the bank's stacks move, and fall
back to eager prefill when capturing fails. The graphs need CUDA: those tests are marked `gpu`."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from petkit.core.capabilities import RowTerms
from petkit.serve.engine import Engine, GenerationRequest
from petkit.serve.prefill_graphs import PrefillGraphs


def tiny(device: str = "cpu") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # peaked logits: no near-ties between greedy candidates
    return model.to(device).eval()


def terms(model: torch.nn.Module, rank: int, seed: int, projs: tuple[str, ...]) -> dict[str, RowTerms]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for proj in projs:
            lin = getattr(layer.self_attn, proj)
            a = torch.randn(rank, lin.in_features, generator=g) * 0.5
            b = torch.randn(lin.out_features, rank, generator=g) * 0.5
            out[f"model.layers.{i}.self_attn.{proj}"] = RowTerms(a, b, 2.0)
    return out


def engine(model: torch.nn.Module, graphs: bool, resident: int = 3) -> Engine:
    e = Engine(copy.deepcopy(model), None, max_batch=8, max_adapters=resident, cuda_graphs=graphs)
    e.eos = set()
    e.pool.register("a", terms(model, 4, 1, ("q_proj", "v_proj")), "lora")
    e.pool.register("b", terms(model, 2, 2, ("q_proj",)), "lora")
    return e


def serve(e: Engine, jobs: list[tuple[list[int], str | None]], together: bool) -> list[list[int]]:
    handles = []
    for ids, adapter in jobs:
        handles.append(e.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, max_new_tokens=6)))
        if not together:
            while e.step():
                pass
    while e.step():
        pass
    return [h.token_ids for h in handles]


def jobs(lengths: tuple[int, ...], adapters: tuple[str | None, ...]) -> list[tuple[list[int], str | None]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(3, 256, (n,), generator=g).tolist(), a) for n, a in zip(lengths, adapters)]


def test_buckets_and_no_graphs_on_the_cpu() -> None:
    model = tiny()
    graphs = PrefillGraphs(model, Engine(model, None).pool.bank, smallest=16, largest=2048)
    assert [graphs.bucket(n) for n in (1, 16, 17, 64, 65, 512, 513)] == [16, 16, 32, 64, 128, 512, None]
    assert graphs.largest == 512  # the model's max_position_embeddings
    assert not graphs.enabled and graphs.run([1, 2, 3], 0) is None
    assert Engine(model, None).graphs is None


@pytest.mark.gpu
def test_graphed_prefills_give_the_eager_engines_tokens_for_the_base_and_every_adapter() -> None:
    model = tiny("cuda")
    eager, graphed = engine(model, False), engine(model, True)
    work = jobs((5, 16, 17, 40, 100, 9), (None, "a", "b", "a", None, "b"))
    for together in (False, True):
        assert serve(graphed, work, together) == serve(eager, work, together)
    slots = {graphed.pool.slots[name] for name in ("a", "b")}
    assert graphed.graphs.enabled and graphed.graphs.per_slot
    assert {(16, 0), (128, 0)} <= set(graphed.graphs._graphs)
    assert {which for (_, which) in graphed.graphs._graphs if which} == slots
    # the graphed prefill's logits are the eager prefill's (fp32; padding changes only GEMM shapes)
    slot = graphed.pool.acquire("a")
    logits, cache = graphed.graphs.run(work[3][0], slot)
    with graphed.pool.bank.using([slot]), torch.no_grad():
        out = graphed.model(input_ids=torch.tensor([work[3][0]], device="cuda"), use_cache=True)
    graphed.pool.release("a")
    torch.testing.assert_close(logits, out.logits[0, -1], rtol=1e-4, atol=1e-4)
    assert cache.layers[0].keys.shape[2] == len(work[3][0])


@pytest.mark.gpu
@pytest.mark.parametrize("per_slot,kernel", [(True, False), (False, True), (False, False)],
                         ids=["per-slot", "one-graph-kernel", "one-graph-gather"])
def test_adapter_graphs_are_captured_again_when_the_bank_grows(per_slot, kernel) -> None:
    model = tiny("cuda")
    eager, graphed = engine(model, False), engine(model, True)
    graphed.graphs = PrefillGraphs(graphed.model, graphed.pool.bank, per_slot=per_slot, kernel=kernel)
    work = jobs((12, 20), ("a", "b"))
    assert serve(graphed, work, True) == serve(eager, work, True)
    layout = graphed.pool.bank.layout
    for e in (eager, graphed):  # a larger rank and a new path: the stacks are reallocated
        e.pool.register("c", terms(model, 8, 3, ("v_proj", "o_proj")), "lora")
    work = jobs((12, 20, 7, 20, 12), ("c", "a", "c", "b", "a"))  # every earlier (bucket, slot) again
    assert serve(graphed, work, False) == serve(eager, work, False)
    assert graphed.pool.bank.layout > layout and graphed.graphs.enabled  # no capture fell back
    layout = graphed.pool.bank.layout
    assert all((g.layout[0] if per_slot else g.layout) == layout for (_, which), g in graphed.graphs._graphs.items() if which)


@pytest.mark.gpu
def test_per_slot_graphs_follow_what_each_slot_holds() -> None:
    """One graph per slot reads the slot in place; a slot refilled with an adapter on other paths
    (no reallocation) is captured again, and a bounded number of graphs is kept."""
    model = tiny("cuda")
    eager, graphed = engine(model, False, resident=1), engine(model, True, resident=1)  # one slot, refilled
    graphed.graphs = PrefillGraphs(graphed.model, graphed.pool.bank, per_slot=True, max_graphs=3)
    for e in (eager, graphed):
        e.pool.register("c", terms(model, 4, 4, ("k_proj",)), "lora")
    work = jobs((12, 20, 7, 30, 14, 5), ("a", "b", "c", "a", None, "b"))
    assert serve(graphed, work, False) == serve(eager, work, False)
    assert len(graphed.graphs._graphs) <= 3
    graphed.graphs.max_bytes = 1  # a byte budget below one graph's outputs: only the newest is kept
    assert serve(graphed, jobs((40,), ("a",)), False) == serve(eager, jobs((40,), ("a",)), False)
    assert len(graphed.graphs._graphs) == 1


@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager_prefill_and_says_so(monkeypatch, caplog) -> None:
    model = tiny("cuda")
    eager, graphed = engine(model, False), engine(model, True)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    work = jobs((10, 30), (None, "a"))
    with caplog.at_level("WARNING", logger="petkit.serve"):
        assert serve(graphed, work, True) == serve(eager, work, True)
    assert not graphed.graphs.enabled and "CUDA-graph prefill is off" in caplog.text


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sharing_computes_one_shrink_per_sibling_group_and_the_same_logits(device) -> None:
    model = tiny(device)
    e = Engine(model, None, max_batch=4, max_adapters=2, cuda_graphs=False)
    e.pool.register("a", terms(model, 4, 1, ("q_proj", "v_proj", "o_proj")), "lora")
    bank, slot = e.pool.bank, e.pool.acquire("a")
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad(), bank.using([slot]):
        with _Count() as plain_ops:
            plain = model(input_ids=ids).logits
        with bank.sharing(), _Count() as shared_ops:
            shared = model(input_ids=ids).logits
        with bank.using([0]):
            base = model(input_ids=ids).logits
    layers = len(model.model.layers)  # q and v read one input: one shrink for both; o its own
    assert plain_ops.ops["bmm"] - shared_ops.ops["bmm"] == layers  # (attention may add bmms of its own)
    assert shared_ops.ops["baddbmm_"] == 3 * layers == plain_ops.ops["baddbmm"] + shared_ops.ops["baddbmm"]
    assert (plain - base).abs().max() > 1e-2  # the adapter is live
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)


def test_sharing_follows_a_refilled_slot_and_a_grown_bank() -> None:
    model = tiny()
    e = Engine(model, None, max_batch=4, max_adapters=2, cuda_graphs=False)
    bank = e.pool.bank
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(4))

    def both(slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), bank.using([slot]):
            plain = model(input_ids=ids).logits
            with bank.sharing():
                return plain, model(input_ids=ids).logits

    bank.put(1, terms(model, 4, 1, ("q_proj", "v_proj")))
    plain, shared = both(1)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)
    joints, layout = bank._joints, bank.layout
    bank.put(1, terms(model, 4, 7, ("q_proj", "v_proj")))  # same shapes: written in place
    assert bank.layout == layout and bank._joints is joints
    refilled, shared = both(1)
    assert (refilled - plain).abs().max() > 1e-2
    torch.testing.assert_close(shared, refilled, rtol=1e-4, atol=1e-4)
    bank.put(1, terms(model, 8, 9, ("q_proj", "k_proj", "v_proj")))  # larger rank, a new path
    assert bank._joints is None
    grown, shared = both(1)
    torch.testing.assert_close(shared, grown, rtol=1e-4, atol=1e-4)
    assert len({id(j) for j in bank._joints.values()}) == len(model.model.layers)  # q/k/v per layer


def test_sharing_leaves_an_indexed_row_to_its_own_path() -> None:
    model = tiny()
    e = Engine(model, None, max_batch=4, max_adapters=2, cuda_graphs=False)
    bank = e.pool.bank
    bank.put(1, terms(model, 4, 1, ("q_proj", "v_proj")))
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    slot = torch.tensor([1])
    with torch.no_grad():
        with bank.using([1]):
            alone = model(input_ids=ids).logits
        with bank.indexed_row(slot), bank.sharing():
            shared = model(input_ids=ids).logits
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
