"""core.lowrank_rows: the fused per-row low-rank kernel (slot read on the device) against the bank's
eager bmm + baddbmm path, in Triton's CPU interpreter; and the bank's kernel path in a model."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import petkit as pk  # noqa: E402
from petkit.core.batched_lowrank import LowRankBank  # noqa: E402
from petkit.core.lowrank_rows import lowrank_rows  # noqa: E402
from petkit.core.mixed_batch import adapter_terms  # noqa: E402
from toys import llama, perturb  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    """Kernels launched inside the test run in Triton's CPU interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,tokens,fan_in,fan_out,rank", [(1, 37, 70, 45, 3), (3, 1, 64, 96, 16), (2, 5, 33, 20, 20)])
def test_each_row_gets_its_slots_terms_as_the_eager_path_computes_them(interpret, dtype, rows, tokens, fan_in,
                                                                      fan_out, rank) -> None:
    g = torch.Generator().manual_seed(rows + tokens)
    slots_n = 4
    x = torch.randn(rows, tokens, fan_in, generator=g).to(dtype)
    y = torch.randn(rows, tokens, fan_out, generator=g).to(dtype)
    a_t = (torch.randn(slots_n, fan_in, rank, generator=g) * 0.3).to(dtype)
    b_t = (torch.randn(slots_n, rank, fan_out, generator=g) * 0.3).to(dtype)
    a_t[0], b_t[0] = 0, 0  # slot 0: the base
    slots = torch.tensor([(2 * i + 1) % slots_n for i in range(rows)][:-1] + [0], dtype=torch.long)
    got = lowrank_rows(x, y, a_t, b_t, slots)
    want = torch.baddbmm(y, torch.bmm(x, a_t[slots]), b_t[slots])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # as close to the float64 result as the eager path is (the interpreter's casts truncate)
        exact = torch.baddbmm(y.double(), torch.bmm(x.double(), a_t[slots].double()), b_t[slots].double())
        err_eager, err_kernel = (float((t.double() - exact).abs().max()) for t in (want, got))
        assert err_kernel <= 2.5 * err_eager + 1e-6, (err_eager, err_kernel)
    assert torch.equal(got[-1], y[-1])  # a slot with no terms adds exactly nothing
    assert got.data_ptr() != y.data_ptr()


def test_the_banks_kernel_path_equals_its_gather_path_and_falls_back_for_gains(interpret) -> None:
    """indexed_row(kernel=True) gives what indexed_row() gives for plain LoRA slots; a DoRA slot
    (gains) and a 2-D input fall back to the gather."""
    m = llama()
    for i, (name, cfg) in enumerate({"a": pk.LoraConfig(r=2, targets=["q_proj", "v_proj"]),
                                     "d": pk.DoraConfig(r=3, targets=["q_proj"])}.items()):
        pk.attach(m, cfg, name=name, seed=i)
        perturb(pk.trainable_parameters(m), seed=i + 1, scale=0.6)
    ids = torch.randint(3, 120, (1, 7), generator=torch.Generator().manual_seed(0))
    with pk.disabled(m), torch.no_grad():
        bank = LowRankBank(m, 3)
        bank.put(1, adapter_terms(m, "a"))
        bank.put(2, adapter_terms(m, "d"))
        index = torch.zeros(1, dtype=torch.long)
        for slot in (1, 2, 0):
            index.fill_(slot)
            with bank.indexed_row(index):
                want = m(input_ids=ids).logits
            with bank.indexed_row(index, kernel=True):
                got = m(input_ids=ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        bank.close()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_on_cuda_in_bf16_the_kernel_is_as_close_to_fp64_as_the_eager_path(tokens) -> None:
    g = torch.Generator().manual_seed(tokens)
    x, y = torch.randn(2, tokens, 2048, generator=g), torch.randn(2, tokens, 256, generator=g)
    a_t, b_t = torch.randn(5, 2048, 16, generator=g) * 0.02, torch.randn(5, 16, 256, generator=g) * 0.02
    x, y, a_t, b_t = (t.cuda().bfloat16() for t in (x, y, a_t, b_t))
    slots = torch.tensor([3, 1], device="cuda")
    got = lowrank_rows(x, y, a_t, b_t, slots)
    want = torch.baddbmm(y, torch.bmm(x, a_t[slots]), b_t[slots])
    exact = torch.baddbmm(y.double(), torch.bmm(x.double(), a_t[slots].double()), b_t[slots].double())
    err_eager, err_kernel = (float((t.double() - exact).abs().max()) for t in (want, got))
    assert err_kernel <= 1.5 * err_eager + 1e-6, (err_eager, err_kernel)
