"""Activation memory on the CPU: checkpointing modes (same loss and gradients as without, how
many matmuls each recomputes), offload, block compilation and the compiler's activation budget."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.training import TrainConfig, train
from petkit.training.activations import activation_checkpointing

sys.path.insert(0, str(Path(__file__).parent))
from test_train_modes import LLAMA, attached, lm_examples, loss_and_grads, padded  # noqa: E402
from toys import TOYS, llama  # noqa: E402


@pytest.mark.parametrize("method", sorted(LLAMA))
@pytest.mark.parametrize("every,mode", [(1, "full"), (2, "full"), (1, "selective"),
                                        (1, "elementwise")],
                         ids=["full", "every-2", "selective", "elementwise"])
def test_checkpointing_gives_the_same_loss_and_gradients(method: str, every: int,
                                                         mode: str) -> None:
    model, params = attached(method)
    batch = padded(lm_examples(3))
    ref_loss, ref_grads = loss_and_grads(model, params, batch)
    with activation_checkpointing(model, every, mode) as wrapped:
        loss, grads = loss_and_grads(model, params, batch)
    assert wrapped == (2 if every == 1 else 1)  # the tiny llama has 2 blocks
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], atol=1e-6, rtol=1e-5)
    assert "forward" not in vars(model.get_submodule("model.layers.0"))  # restored


def test_recompute_modes_redo_fewer_matmuls_in_order() -> None:
    """full recomputes every matmul of a block, selective only the non-reducing ones, elementwise
    none: the backward pass of a LoRA model runs as many matmuls as without checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                               ) -> Any:
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    model, params = attached("lora")
    batch = padded(lm_examples(3))
    counts = {}
    for mode in ("off", "full", "selective", "elementwise"):
        with activation_checkpointing(model, 0 if mode == "off" else 1,
                                      "full" if mode == "off" else mode), CountMatmuls() as count:
            loss_and_grads(model, params, batch)
        counts[mode] = count.count
    assert counts["full"] > counts["selective"] > counts["elementwise"] == counts["off"], counts
    with pytest.raises(ConfigError, match="checkpointing mode"):
        with activation_checkpointing(model, 1, "some"):
            pass


def test_checkpointing_needs_a_block_stack() -> None:
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        with activation_checkpointing(TOYS["mlp"](0), 1):
            pass


def test_checkpointing_and_offload_through_train_match_a_plain_run() -> None:
    results = []
    for extra in ({}, {"activation_checkpointing": "full"}, {"activation_offload": True}):
        torch.manual_seed(0)
        model = pk.attach(llama(), pk.LoraConfig(r=4, dropout=0.0))
        cfg = TrainConfig(max_steps=3, batch_size=3, lr=1e-2, progress=False, **extra)
        results.append((train(model, lm_examples(), cfg).history,
                        torch.cat([p.detach().flatten()
                                   for p in pk.trainable_parameters(model).values()])))
    for history, flat in results[1:]:
        assert history[-1]["train_loss"] == pytest.approx(results[0][0][-1]["train_loss"], rel=1e-5)
        torch.testing.assert_close(flat, results[0][1], atol=1e-6, rtol=1e-5)


# --- compile ---------------------------------------------------------------------------------


def lora_losses(data: list[dict[str, torch.Tensor]], layers: int, steps: int,
                **modes: Any) -> list[float]:
    """Per-step training losses of LoRA on a seeded tiny Llama of `layers` identical blocks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = pk.attach(transformers.LlamaForCausalLM(config), pk.LoraConfig(r=4))
    cfg = TrainConfig(max_steps=steps, batch_size=3, lr=1e-2, progress=False, log_every=1,
                      **modes)
    return [h["train_loss"] for h in train(model, data, cfg).history]


@pytest.mark.slow  # compiles a block with inductor on the CPU (~15 s)
def test_compiling_blocks_compiles_one_block_graph_for_all_blocks() -> None:
    """compile_scope='blocks': the same losses as eager, and the 4 identical blocks share their
    compiled graph (regional compilation) instead of one graph of the whole model: two graphs,
    since the first block's input (the frozen embeddings) needs no gradient and the others' do."""
    from torch._dynamo.utils import counters

    def run(**modes: Any) -> list[float]:
        return lora_losses(same_length, layers=4, steps=3, activation_checkpointing="selective",
                           **modes)

    same_length = [{"input_ids": row, "labels": row} for row in torch.randint(3, 60, (9, 8))]
    eager = run()
    torch._dynamo.reset()
    counters.clear()
    compiled = run(compile=True, compile_scope="blocks")
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="compile_scope"):
        TrainConfig(compile=True, compile_scope="layers")


@pytest.mark.slow  # compiles a block with inductor on the CPU
def test_an_activation_budget_reaches_the_compiler_and_keeps_the_losses() -> None:
    """activation_budget: the partitioner sees the fraction while the blocks compile, and the
    losses equal eager mode's; without compile (or with checkpointing) it is refused."""
    import torch._functorch.config as functorch_config
    import transformers

    seen: list[float] = []
    block_forward = transformers.models.llama.modeling_llama.LlamaDecoderLayer.forward

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(functorch_config.activation_memory_budget)
        return block_forward(self, *args, **kwargs)

    def run(**modes: Any) -> list[float]:
        return lora_losses(same_length, layers=2, steps=2, **modes)

    same_length = [{"input_ids": row, "labels": row} for row in torch.randint(3, 60, (6, 8))]
    eager = run()
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.models.llama.modeling_llama.LlamaDecoderLayer, "forward", spy)
        compiled = run(compile=True, compile_scope="blocks", activation_budget=0.3)
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert seen[-1] == 0.3  # the steps ran with the budget set (the 1.0s: the eager pre-check)
    assert functorch_config.activation_memory_budget == 1.0  # restored after the run
    for bad in ({"activation_budget": 0.5},
                {"activation_budget": 0.5, "compile": True, "activation_checkpointing": "full"},
                {"activation_budget": 0.0, "compile": True}):
        with pytest.raises(ConfigError, match="activation_budget"):
            TrainConfig(**bad)


@pytest.mark.slow  # compiles a block with inductor on the CPU, three times
def test_quantized_activations_keep_the_forward_and_approximate_the_gradients() -> None:
    """activation_quantization=fp8: the partitioner's saved activations go through the
    quantization pass (counted), the first step's loss (forward only) is the unquantized run's
    exactly, the next steps follow it closely but not identically (the backward read fp8 copies);
    tensors under the size floor are left alone (same losses as without quantization)."""
    from torch._dynamo.utils import counters

    from petkit.training import RuntimeConfig

    def run(kind: str = "none", min_mb: float = 0.0) -> list[float]:
        counters.clear()  # no dynamo reset between runs: a run must not reuse another's graphs
        runtime = RuntimeConfig(compile=True, compile_scope="blocks", precision="fp32",
                                activation_checkpointing="elementwise",
                                activation_quantization=kind, activation_quantization_min_mb=min_mb)
        return lora_losses(same_length, layers=2, steps=4, runtime=runtime)

    same_length = [{"input_ids": row, "labels": row} for row in torch.randint(3, 60, (12, 16))]
    import torch._functorch.partitioners as partitioners

    widths: dict[str, set[int]] = {}
    shapes: dict[str, set[torch.Size]] = {}
    perform = partitioners.perform_fp8_activation_quantization

    def spy(fwd_module: Any, *args: Any, **kwargs: Any) -> None:  # the widths it quantized
        perform(fwd_module, *args, **kwargs)
        outputs = fwd_module.graph.find_nodes(op="output")[0].args[0]
        quantized = [n.meta["val"].shape for n in outputs if "fp8_quant_" in n.name]
        widths[kind] |= {shape[-1] for shape in quantized}
        shapes[kind] |= set(quantized)

    plain = run()
    assert not counters["inductor"]["activation_quantization_fwd_aten_pass"]
    runs = {}
    for kind in ("fp8", "fp8-mlp"):
        widths[kind], shapes[kind] = set(), set()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(partitioners, "perform_fp8_activation_quantization", spy)
            runs[kind] = run(kind)
        assert counters["inductor"]["activation_quantization_fwd_aten_pass"] >= 1, kind
        assert counters["inductor"]["activation_quantization_bwd_aten_pass"] >= 1, kind
    floor = run("fp8", min_mb=1e6)
    assert not counters["inductor"]["activation_quantization_fwd_aten_pass"]
    assert run() == plain and not counters["inductor"]["activation_quantization_fwd_aten_pass"]
    torch._dynamo.reset()
    for kind, losses in runs.items():
        assert losses[0] == plain[0], kind
        assert losses[1:] == pytest.approx(plain[1:], rel=2e-2) and losses[1:] != plain[1:], kind
    assert widths["fp8-mlp"] == {64} and {32, 64} < widths["fp8"], widths  # hidden 32, MLP 64
    assert runs["fp8-mlp"] != runs["fp8"]  # fewer tensors rounded: another trajectory
    weights = {(64, 32), (32, 64), (32, 32), (16, 32), (4, 32), (4, 64), (32, 4), (64, 4), (16, 4)}
    assert not weights & {tuple(s) for s in shapes["fp8"]}, shapes  # no weight is rounded
    assert floor == plain


def test_activation_quantization_is_checked() -> None:
    """A kind outside the list, a negative floor, or quantization without compile: ConfigError
    naming the flag."""
    from petkit.training import RuntimeConfig

    assert RuntimeConfig(compile=True, activation_quantization="fp8").activation_quantization == "fp8"
    for bad, flag in (({"activation_quantization": "fp8-e5m2", "compile": True},
                       "activation_quantization"),
                      ({"activation_quantization": "fp8"}, "activation_quantization.*compile"),
                      ({"activation_quantization_min_mb": -1.0}, "activation_quantization_min_mb"),
                      ({"activation_quantization_min_mb": float("nan")}, "min_mb")):
        with pytest.raises(ConfigError, match=flag):
            RuntimeConfig(**bad)
    import torch._functorch.partitioners as partitioners

    from petkit.training.activations import quantized_activations

    with pytest.MonkeyPatch.context() as patch:  # a torch without the pass
        patch.delattr(partitioners, "should_quantize")
        with pytest.raises(ConfigError, match="activation_quantization=fp8 needs torch's"):
            with quantized_activations("fp8", 1.0):
                pass


@pytest.mark.slow  # compiles a block with inductor on the CPU, twice
@pytest.mark.parametrize("mode", ["elementwise", "selective"])
def test_compiled_lora_adds_its_b_product_into_the_base_output_in_place(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile LoRA's B-product accumulates into the base output in place
    (`petkit::addmm_into`: no out-of-place addmm, which copies the base output first); the
    losses are eager mode's; eager mode keeps the out-of-place addmm (eager selective
    checkpointing refuses a saved output mutated in place)."""
    from torch.profiler import profile

    from petkit.core import accumulate
    from petkit.training import RuntimeConfig

    monkeypatch.setattr(accumulate, "IN_PLACE", True)  # the default; set so the test says so
    torch._dynamo.reset()
    data = [{"input_ids": row, "labels": row} for row in torch.randint(3, 60, (12, 16))]

    def ops(**modes: Any) -> tuple[list[float], dict[str, int]]:
        with profile() as prof:
            losses = lora_losses(data, layers=2, steps=3, **modes)
        return losses, {e.key: e.count for e in prof.key_averages()}

    runtime = RuntimeConfig(compile=True, compile_scope="blocks", precision="fp32",
                            activation_checkpointing=mode)
    try:
        compiled, compiled_ops = ops(runtime=runtime)
    finally:
        torch._dynamo.reset()  # no later test reuses graphs compiled with the switch on
    eager, eager_ops = ops(activation_checkpointing=mode)
    assert compiled == pytest.approx(eager, rel=1e-5)
    # LoRA on q and v (its Llama default) x 2 blocks x 3 steps, more where a backward recomputes
    assert "petkit::addmm_into" not in eager_ops and eager_ops["aten::addmm"] >= 2 * 2 * 3
    assert compiled_ops["petkit::addmm_into"] >= 2 * 2 * 3
    # out-of-place addmm would run at least as often (a few run outside the compiled blocks)
    assert compiled_ops.get("aten::addmm", 0) < eager_ops["aten::addmm"] // 2
