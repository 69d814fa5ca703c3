"""petkit's Triton kernel for the low-rank delta (`training.triton_delta`, `--runtime.kernels=
triton`): forward and every gradient against the eager expression, in Triton's CPU interpreter
(small shapes, ragged tiles, ranks below, at and above 16) and on CUDA (`gpu`: bf16 at the
benchmark's layer shapes); a tiny Llama on the kernel through `fused_deltas` and `pk.train`; the
custom op under torch.compile. Skipped where Triton is not installed."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import petkit as pk  # noqa: E402
from petkit.core.delta import iter_deltas  # noqa: E402
from petkit.training import fused_delta, triton_delta  # noqa: E402
from petkit.training.fused_delta import fused_deltas  # noqa: E402
from toys import llama  # noqa: E402

CPU = ("cpu",)


@pytest.fixture
def interpret(monkeypatch):
    """Kernels launched inside the test run in Triton's CPU interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _eager(x, w, a, b, scale):
    return F.linear(x, w) + scale * F.linear(F.linear(x, a), b)


def _grads(fn, x, w, a, b, scale, x_grad=True):
    x = x.detach().clone().requires_grad_(x_grad)
    a, b = (t.detach().clone().requires_grad_(True) for t in (a, b))
    y = fn(x, w, a, b, scale)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


def _factors(tokens, out_f, in_f, rank, device="cpu", b_scale=0.25):
    gen = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": gen, "device": device}
    x = torch.randn(2, tokens, in_f, **kw)
    w = torch.randn(out_f, in_f, **kw) / in_f**0.5
    a = torch.randn(rank, in_f, **kw) / in_f**0.5
    b = torch.randn(out_f, rank, **kw) * b_scale
    return x, w, a, b


# ragged shapes (no dimension a multiple of the 32-wide interpreter tile), r below / at / above 16
@pytest.mark.parametrize("tokens,out_f,in_f,rank", [(37, 40, 48, 4), (16, 64, 33, 16),
                                                    (9, 24, 70, 24)])
def test_the_kernel_in_fp32_equals_the_eager_expression_and_its_gradients(
        interpret, tokens, out_f, in_f, rank) -> None:
    x, w, a, b = (t.double() for t in _factors(tokens, out_f, in_f, rank))
    want = _grads(_eager, x, w, a, b, 0.7)
    got = _grads(triton_delta.lowrank_linear, x.float(), w.float(), a, b, 0.7)
    for ref, out in zip(want, got):  # y, dx, dA, dB; A and B's gradients in their fp64
        assert out.dtype == ref.dtype or out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b_scale", [0.25, 1e-3])  # a delta near W's size, and one below its ulp
@pytest.mark.parametrize("tokens,out_f,in_f,dtype", [(40, 64, 96, torch.bfloat16),
                                                     (40, 96, 64, torch.bfloat16),
                                                     (40, 64, 96, torch.float16)])
def test_the_kernel_in_half_precision_is_as_close_to_fp64_as_the_eager_path(
        interpret, tokens, out_f, in_f, dtype, b_scale) -> None:
    x, w, a, b = _factors(tokens, out_f, in_f, 16, b_scale=b_scale)
    x, w = x.to(dtype), w.to(dtype)
    exact = _grads(_eager, x.double(), w.double(), a.double(), b.double(), 2.0)
    with torch.autocast("cpu", dtype=dtype):
        eager = _grads(_eager, x, w, a, b, 2.0)
    kernel = _grads(triton_delta.lowrank_linear, x, w, a, b, 2.0)
    assert kernel[0].dtype == dtype and kernel[2].dtype == torch.float32
    for ref, e, k in zip(exact, eager, kernel):  # y, dx, dA, dB
        scale = float(ref.abs().max())
        err_eager, err_kernel = (float((t.double() - ref).abs().max()) / scale for t in (e, k))
        assert err_kernel <= 1.25 * err_eager + 2e-3, (err_eager, err_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_on_the_kernel_equals_the_eager_expression_with_the_same_mask(interpret,
                                                                              dtype) -> None:
    """y = x W^T + s (dropout(x) A^T) B^T: the mask is drawn from torch's generator, so the
    same seed gives it again for the reference."""
    x, w, a, b = _factors(21, 40, 48, 4)
    x, w = x.to(dtype), w.to(dtype)
    torch.manual_seed(7)
    got = _grads(lambda *args: triton_delta.lowrank_linear(*args, dropout=0.3), x, w, a, b, 0.7)
    torch.manual_seed(7)
    keep = triton_delta.keep_mask(x.reshape(-1, 48), 0.3).view(x.shape)
    assert 0.5 < float(keep.float().mean()) < 0.9

    def eager(x, w, a, b, scale):
        return F.linear(x, w) + scale * F.linear(F.linear(x * keep / 0.7, a), b)

    want = _grads(eager, x.double(), w.double(), a.double(), b.double(), 0.7)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ref, out in zip(want, got):  # y, dx, dA, dB
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * float(ref.abs().max()))


def test_an_empty_batch_gives_empty_outputs(interpret) -> None:
    x, w, a, b = _factors(0, 16, 32, 4)
    y, dx, da, db = _grads(triton_delta.lowrank_linear, x, w, a, b, 2.0)
    assert y.shape == (2, 0, 16) and dx.shape == (2, 0, 32)
    assert not da.any() and not db.any()


def test_the_kernel_skips_the_input_gradient_when_the_input_needs_none(interpret) -> None:
    x, w, a, b = _factors(8, 16, 32, 4)
    want = _grads(_eager, x, w, a, b, 2.0, x_grad=False)
    got = _grads(triton_delta.lowrank_linear, x, w, a, b, 2.0, x_grad=False)
    assert got[1] is None
    for ref, out in zip(want[2:], got[2:]):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_the_custom_op_compiles_in_one_graph_with_its_backward(interpret) -> None:
    x, w, a, b = _factors(12, 16, 32, 4)
    want = _grads(_eager, x, w, a, b, 0.5)
    torch._dynamo.reset()
    compiled = torch.compile(triton_delta.lowrank_linear, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, x, w, a, b, 0.5)
    torch._dynamo.reset()
    for ref, out in zip(want, got):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_unfit_layers_say_why(interpret, monkeypatch) -> None:
    assert triton_delta.unfit(torch.device("cpu"), torch.bfloat16, 16) is None  # interpreter
    assert triton_delta.unfit(torch.device("cpu"), torch.float32, 16) == \
        "triton kernel for compute dtype torch.float32"
    assert triton_delta.unfit(torch.device("cpu"), torch.bfloat16, 256) == \
        "triton kernel for rank above 128"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_delta.unfit(torch.device("cpu"), torch.bfloat16, 16) == "triton kernel on cpu"


# the strides of the forward (X = x, P = W^T, Q = A^T, R = B^T) and of the input gradient
# (X = dy, P = W, Q = B, R = A) at the 1.1B shape's MLP (in 2048, out 5632, r 16)
# and with dropout: H given to the forward, the mask (tokens, in) read by the input gradient's
_LAYOUTS = {"forward": dict(sxm=2048, sxk=1, spk=1, spn=2048, sqk=1, sqr=2048, srr=1, srn=16,
                            scm=5632, scn=1, shm=16, shr=1, skm=5632, skn=1),
            "backward": dict(sxm=5632, sxk=1, spk=2048, spn=1, sqk=16, sqr=1, srr=2048, srn=1,
                             scm=2048, scn=1, shm=16, shr=1, skm=2048, skn=1)}
_VARIANTS = {"forward": dict(GIVEN_H=False, MASKED=False),
             "backward": dict(GIVEN_H=False, MASKED=False),
             "forward-dropout": dict(GIVEN_H=True, MASKED=False),
             "backward-dropout": dict(GIVEN_H=False, MASKED=True)}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
@pytest.mark.parametrize("tile", [triton_delta.GPU_TILES[0], triton_delta.GPU_TILES[1],
                                  triton_delta.GPU_TILES[-1]])
def test_the_kernel_compiles_for_hopper_pipelined_without_spills(variant, tile, tmp_path,
                                                                 monkeypatch) -> None:
    """No GPU needed: Triton compiles the GPU path (not the interpreter's) to PTX for sm_90 as a
    launch specialises it (unit strides constant, the rest divisible by 16): tensor-core wgmma,
    asynchronous copies in a multi-stage pipeline, no register spills, shared memory that fits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    fn = triton.jit(triton_delta._lowrank_gemm_kernel)
    bm, bn, bk, stages, warps = tile
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": 16, "GROUP_M": 8,
              "EVEN_K": True, "WIDEN": False, **_VARIANTS[variant]}
    strides = _LAYOUTS[variant.split("-")[0]]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ("scale", "keep_scale"):
            signature[name] = "fp32"
        elif name == "m_bucket":
            signature[name] = "i32"
        elif name in consts or strides.get(name) == 1:
            signature[name] = "constexpr"
            consts.setdefault(name, 1)
        else:
            signature[name] = ("*i1" if name == "keep_ptr" else "*bf16") \
                if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    single_stage = (bm * bk + bk * bn + bk * 16) * 2
    assert single_stage * 2 <= compiled.metadata.shared <= 227 * 1024


class _SameMask(torch.nn.Module):
    """LoRA's dropout drawing its mask as the Triton path does (`keep_mask`), so that an eager
    run and a fused one from the same seed drop the same elements."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = triton_delta.keep_mask(x.reshape(-1, x.shape[-1]), self.p).view(x.shape)
        return x * keep / (1 - self.p)


def _lora_llama(device="cpu", rank=4, dropout=0.0) -> torch.nn.Module:
    model = llama()
    torch.manual_seed(0)
    pk.attach(model, pk.LoraConfig(r=rank, targets="all-linear", dropout=dropout))
    for _, wrapper in iter_deltas(model):
        if dropout:
            wrapper.dropout = _SameMask(dropout)
    with torch.no_grad():  # B != 0, so the delta's gradients reach A and the input
        for param in pk.trainable_parameters(model).values():
            param.normal_(0, 0.2)
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model.to(device).train()


def _loss_and_grads(model, ids, bf16=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in pk.trainable_parameters(model).items()}


def _assert_as_close_as_eager(exact, eager, kernel) -> None:
    """The kernel's loss, and all its gradients as one vector, are as close to the fp32 run's
    as the eager bf16 run's are (half more, plus 2%: the tiny model's bf16 gradients are noisy,
    8% from fp32's eagerly, 29% with dropout, so one vector's norm, not each tensor's largest
    element; a wrong term or mask is off by its whole size; fp32 is checked tightly below)."""
    def flat(run):
        return torch.cat([run[0].reshape(1)] + [run[1][k].flatten() for k in sorted(run[1])])

    for k in exact[1]:
        assert kernel[1][k].dtype == exact[1][k].dtype
    ref = flat(exact)
    torch.testing.assert_close(kernel[0], exact[0], rtol=1e-2, atol=1e-2)
    err_eager, err_kernel = (float((flat(run) - ref).norm() / ref.norm()) for run in (eager, kernel))
    assert err_kernel <= 1.5 * err_eager + 2e-2, (err_eager, err_kernel)


def _check_llama(device, devices, tokens, compiled=False, dropout=0.0) -> None:
    """A tiny Llama (bf16 base, fp32 LoRA) on the kernel: loss and gradients against the same
    model in fp32 and in eager bf16 (`compiled`: as compile_scope="blocks" with selective
    recompute runs it; `dropout`: LoRA's, the same masks in all three runs)."""
    from petkit.training.activations import activation_checkpointing, compiled_blocks

    model = _lora_llama(device, dropout=dropout)
    ids = torch.randint(3, 100, (2, tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    torch.manual_seed(3)
    eager = _loss_and_grads(model, ids)
    torch.manual_seed(3)
    exact = _loss_and_grads(copy.deepcopy(model).float(), ids, bf16=False)
    torch._dynamo.reset()
    torch.manual_seed(3)
    with contextlib.ExitStack() as stack:
        if compiled:
            stack.enter_context(activation_checkpointing(model, 1, "selective"))
            stack.enter_context(compiled_blocks(model))
        report = stack.enter_context(fused_deltas(model, torch.bfloat16, devices, kernel="triton"))
        assert report.triton == 14 and report.note() == \
            "fused delta on 14 of 14 delta layers (triton kernel on 14)"
        kernel = _loss_and_grads(model, ids)
    _assert_as_close_as_eager(exact, eager, kernel)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_tiny_llama_on_the_kernel_gives_the_eager_loss_and_gradients(interpret, dropout) -> None:
    _check_llama("cpu", CPU, 12, dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_tiny_llama_in_fp32_on_the_kernel_equals_eager(interpret, monkeypatch, dropout) -> None:
    """In fp32 (allowed here only), the kernel's path is the eager computation up to summation
    order: the dispatch, bias, dropout masks and every gradient's routing, checked tightly."""
    monkeypatch.setattr(triton_delta, "DTYPES", (torch.float32,))
    model = _lora_llama(dropout=dropout).float()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    eager = _loss_and_grads(model, ids, bf16=False)
    torch.manual_seed(3)
    with fused_deltas(model, torch.float32, CPU, kernel="triton") as report:
        assert report.triton == 14
        kernel = _loss_and_grads(model, ids, bf16=False)
    torch.testing.assert_close(kernel[0], eager[0], rtol=1e-5, atol=1e-5)
    for key, grad in eager[1].items():
        torch.testing.assert_close(kernel[1][key], grad, rtol=0,
                                   atol=1e-4 * float(grad.abs().max()))


@pytest.mark.slow  # inductor compiles the blocks on the CPU
def test_a_tiny_llama_on_the_kernel_in_compiled_blocks_with_selective_recompute(interpret) -> None:
    _check_llama("cpu", CPU, 12, compiled=True)


@pytest.mark.parametrize("mode,recomputed", [("full", 14), ("selective", 8), ("elementwise", 0)])
def test_recompute_policies_keep_the_kernels_outputs_as_they_keep_a_matmuls(
        interpret, monkeypatch, mode, recomputed) -> None:
    """Selective keeps the outputs of the reducing products (the k, v and down
    projections: 4 of 7 per block recomputed), elementwise keeps all, full none."""
    from petkit.training.activations import activation_checkpointing

    launches = []
    kernel = triton_delta._kernel
    monkeypatch.setattr(triton_delta, "_kernel", lambda interp: launches.append(1) or kernel(interp))
    model = _lora_llama()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with fused_deltas(model, torch.bfloat16, CPU, kernel="triton"):
        base = len(launches)
        _loss_and_grads(model, ids)
        plain = len(launches) - base
        with activation_checkpointing(model, 1, mode):
            _loss_and_grads(model, ids)
    assert len(launches) - base - plain == plain + recomputed


def test_train_on_the_kernel_follows_the_eager_losses(interpret, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fused_delta, "FUSED_DEVICES", CPU)
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    runs = []
    for kernels in ("none", "triton"):
        runtime = pk.RuntimeConfig(device="cpu", precision="bf16", kernels=kernels)
        config = pk.TrainConfig(max_steps=3, batch_size=4, log_every=1, progress=False,
                                runtime=runtime, output_dir=str(tmp_path / kernels))
        runs.append(pk.train(_lora_llama(), data, config))
    assert runs[1].report["kernels"] == \
        "fused delta on 14 of 14 delta layers (triton kernel on 14); liger off"
    losses = [[h["train_loss"] for h in r.history if "train_loss" in h] for r in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,out_f,in_f", [(8192, 2048, 2048), (8192, 5632, 2048),
                                               (8192, 2048, 5632), (100, 256, 512)])
def test_the_kernel_bf16_on_cuda_is_as_close_to_fp64_as_the_eager_path(tokens, out_f,
                                                                      in_f) -> None:
    x, w, a, b = _factors(tokens // 2, out_f, in_f, 16, device="cuda")
    x, w = x.bfloat16(), w.bfloat16()
    exact = _grads(_eager, x.double(), w.double(), a.double(), b.double(), 2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _grads(_eager, x, w, a, b, 2.0)
    kernel = _grads(triton_delta.lowrank_linear, x, w, a, b, 2.0)
    for ref, e, k in zip(exact, eager, kernel):  # y, dx, dA, dB
        scale = float(ref.abs().max())
        err_eager, err_kernel = (float((t.double() - ref).abs().max()) / scale for t in (e, k))
        assert err_kernel <= 1.25 * err_eager + 2e-3, (err_eager, err_kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_tiny_llama_on_the_kernel_on_cuda_gives_the_eager_loss_and_gradients(dropout) -> None:
    _check_llama("cuda", ("cuda",), 64, dropout=dropout)


@pytest.mark.gpu
def test_the_kernel_inside_compiled_blocks_on_cuda_gives_the_eager_loss() -> None:
    _check_llama("cuda", ("cuda",), 64, compiled=True)
