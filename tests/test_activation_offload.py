"""Activation offload (training/activation_offload.py): which blocks move, that parameters never
do, and that loss and gradients are those of a run without it, eager and with compiled blocks.
On the CPU `copy_on_cpu` runs the same paths (copies out at save, back at the backward's read);
the stream-overlapped copies run in the `gpu` test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.training import RuntimeConfig, TrainConfig, train
from petkit.training.activation_offload import ActivationOffload, chosen_blocks
from petkit.training.activations import activation_checkpointing, compiled_blocks

sys.path.insert(0, str(Path(__file__).parent))
from test_train_modes import lm_examples, padded  # noqa: E402
from toys import TOYS  # noqa: E402


def tiny_llama(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2)
    return pk.attach(transformers.LlamaForCausalLM(config), pk.LoraConfig(r=4, init="gaussian"))


def loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   offload: ActivationOffload | None = None, backwards: int = 1
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    params = pk.trainable_parameters(model)
    for p in params.values():
        p.grad = None
    if offload is None:
        loss = model(**batch).loss
    else:
        with offload.saving():
            loss = model(**batch).loss
    for i in range(backwards):
        loss.backward(retain_graph=i + 1 < backwards)
    return loss.item(), {k: p.grad.clone() for k, p in params.items()}


def assert_same(got: tuple[float, dict], want: tuple[float, dict], tol: float = 1e-6) -> None:
    assert got[0] == pytest.approx(want[0], abs=tol)
    assert got[1].keys() == want[1].keys()
    for key, grad in got[1].items():
        torch.testing.assert_close(grad, want[1][key], atol=tol, rtol=1e-5)


@pytest.mark.parametrize("n,fraction,want", [
    (4, 1.0, [0, 1, 2, 3]), (4, 0.5, [0, 2]), (32, 0.5, list(range(0, 32, 2))), (5, 0.01, [0]),
    (10, 0.3, [0, 3, 6]), (3, 0.7, [0, 1, 2]),
    (32, 0.4, [0, 2, 4, 7, 9, 12, 14, 17, 19, 22, 24, 27, 29])])
def test_chosen_blocks_are_spread_from_the_bottom(n: int, fraction: float, want: list[int]
                                                  ) -> None:
    """ceil(fraction * n) blocks, evenly spaced from block 0; the top block only when all are
    (its backward comes first: nothing to hide its fetch behind)."""
    got = chosen_blocks(n, fraction)
    assert got == want
    assert len(got) == -(-round(fraction * n * 1000) // 1000)
    assert n - 1 not in got or len(got) == n


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_eager_offload_moves_the_chosen_blocks_and_keeps_the_gradients(fraction: float) -> None:
    model = tiny_llama()
    batch = padded(lm_examples(3))
    want = loss_and_grads(model, batch)
    offload = ActivationOffload(model, fraction, copy_on_cpu=True)
    moved: list[torch.Tensor] = []
    pack = offload._pack
    offload._pack = lambda t: (moved.append(t), pack(t))[1]  # what the hook is shown
    with offload.installed():
        got = loss_and_grads(model, batch, offload)
    assert_same(got, want)
    assert offload.moved_groups == set(chosen_blocks(4, fraction))
    assert offload.moved_bytes > 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert any(t.untyped_storage().data_ptr() in params for t in moved)  # weights were shown...
    assert offload.moved_bytes < sum(t.untyped_storage().nbytes() for t in moved)  # ...kept
    assert "_compiled_call_impl" not in [k for k, v in vars(model.model.layers[0]).items()
                                         if v is not None]  # restored
    # outside `installed` no block is marked: nothing moves
    loss_and_grads(model, batch, offload)
    assert offload.moved_bytes == 0


def test_offload_fetches_each_group_once_top_down_and_survives_a_second_backward() -> None:
    model = tiny_llama()
    batch = padded(lm_examples(3))
    want = loss_and_grads(model, batch, backwards=2)
    offload = ActivationOffload(model, 1.0, copy_on_cpu=True)
    order: list[int] = []
    fetch = offload._fetch
    offload._fetch = lambda group: (order.append(group), fetch(group))[1]
    with offload.installed():
        got = loss_and_grads(model, batch, offload, backwards=2)
    assert_same(got, want)
    assert order[:4] == [3, 2, 1, 0]  # the first backward: top down, one group ahead
    assert not offload.pending


def test_a_tensor_several_ops_save_moves_once_per_block() -> None:
    """Eager: the LoRA factors of q_proj and v_proj save the same normed input; it is copied
    once and read twice."""
    model = tiny_llama(layers=2)
    batch = padded(lm_examples(3))
    want = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)
    offload = ActivationOffload(model, copy_on_cpu=True)
    with offload.installed(), offload.saving():
        loss = model(**batch).loss
    shared = [ref() for refs in offload.groups.values() for ref in refs if ref().packs > 1]
    assert shared and max(s.packs for s in shared) >= 2
    loss.backward()
    grads = {k: p.grad for k, p in pk.trainable_parameters(model).items()}
    assert_same((loss.item(), grads), want)
    assert all(s.device is None for s in shared)  # released after the last read


def test_two_forwards_then_one_backward() -> None:
    """A preference objective's two forwards, each its own `saving`, then one backward."""
    model = tiny_llama(layers=2)
    first, second = padded(lm_examples(3)), padded(lm_examples(2))

    def run(offload: ActivationOffload | None) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses = []
        for batch in (first, second):
            with offload.saving() if offload else torch.enable_grad():
                losses.append(model(**batch).loss)
        (losses[0] - 0.5 * losses[1]).backward()
        return {k: p.grad.clone() for k, p in pk.trainable_parameters(model).items()}

    want = run(None)
    offload = ActivationOffload(model, copy_on_cpu=True)
    with offload.installed():
        got = run(offload)
    for key, grad in got.items():
        torch.testing.assert_close(grad, want[key], atol=1e-6, rtol=1e-5)


def test_a_model_without_blocks_is_one_group() -> None:
    model = pk.attach(TOYS["mlp"](0), pk.LoraConfig(r=2, targets=["fc1"]))
    x = torch.randn(5, 8)

    def run(offload: ActivationOffload | None) -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        with offload.saving() if offload else torch.enable_grad():
            out = model(x).square().mean()
        out.backward()
        return torch.cat([p.grad.flatten() for p in pk.trainable_parameters(model).values()])

    want = run(None)
    offload = ActivationOffload(model, copy_on_cpu=True)
    torch.testing.assert_close(run(offload), want)
    assert offload.moved_groups == {0}
    with pytest.raises(ConfigError, match="no stack of transformer blocks"):
        ActivationOffload(model, 0.5)


@pytest.mark.slow  # compiles a block with inductor on the CPU
def test_offload_under_compiled_blocks_moves_what_the_graphs_save() -> None:
    """Compiled blocks with elementwise recompute: the hooks see each block graph's saved
    tensors (the block is marked around its compiled call), and the gradients are unchanged."""
    torch._dynamo.reset()
    model = tiny_llama()
    batch = padded(lm_examples(3))
    batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    with activation_checkpointing(model, 1, "elementwise"), compiled_blocks(model):
        want = loss_and_grads(model, batch)
        offload = ActivationOffload(model, 0.5, copy_on_cpu=True)
        with offload.installed():
            got = loss_and_grads(model, batch, offload)
            again = loss_and_grads(model, batch, offload)  # the cached graphs, a second step
    torch._dynamo.reset()
    assert_same(got, want, tol=1e-5)
    assert_same(again, want, tol=1e-5)
    assert offload.moved_groups == {0, 2} and offload.moved_bytes > 0


def test_runtime_checks_of_activation_offload() -> None:
    RuntimeConfig(compile=True, compile_scope="blocks", activation_offload=True)
    with pytest.raises(ConfigError, match="compile_scope=blocks"):
        RuntimeConfig(compile=True, activation_offload=True)
    for bad in (0, 1.5, float("nan"), "half"):
        with pytest.raises(ConfigError, match="activation_offload_fraction"):
            RuntimeConfig(activation_offload=True, activation_offload_fraction=bad)
    with pytest.raises(ConfigError, match="only with activation_offload=true"):
        RuntimeConfig(activation_offload_fraction=0.5)


def test_offload_through_train_on_the_cpu_matches_a_plain_run() -> None:
    """On a CPU device the activations are in host memory already: the run is the plain one."""
    runs = []
    for extra in ({}, {"activation_offload": True, "activation_offload_fraction": 0.5}):
        model = tiny_llama()
        cfg = TrainConfig(max_steps=3, batch_size=3, lr=1e-2, progress=False,
                          runtime=RuntimeConfig(**extra))
        runs.append([h["train_loss"] for h in train(model, lm_examples(), cfg).history])
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_gpu_offload_overlaps_copies_frees_memory_and_keeps_gradients(compiled: bool) -> None:
    """On a GPU: the same gradients as without offload (streams and events in the right order),
    and the peak memory of the step lower by about the chosen blocks' saved bytes."""
    import transformers

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
                                      num_hidden_layers=8, num_attention_heads=8,
                                      num_key_value_heads=4)
    model = pk.attach(transformers.LlamaForCausalLM(config), pk.LoraConfig(r=8, init="gaussian"))
    model.cuda()
    ids = torch.randint(0, 512, (8, 512), device="cuda")
    batch = {"input_ids": ids, "labels": ids}

    def step(offload: ActivationOffload | None) -> tuple[tuple[float, dict], int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = loss_and_grads(model, batch, offload)
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base

    with (compiled_blocks(model) if compiled else torch.enable_grad()):
        step(None)
        want, peak = step(None)
        offload = ActivationOffload(model, 0.5)
        with offload.installed():
            step(offload)
            got, peak_offloaded = step(offload)
    torch._dynamo.reset()
    assert_same(got, want, tol=1e-4)
    assert offload.moved_groups == {0, 2, 4, 6}
    assert peak_offloaded < peak - offload.moved_bytes // 2, (peak, peak_offloaded,
                                                              offload.moved_bytes)
