"""Offloaded optimiser updates (training/offload.py, `--runtime.offload_optimizer`).

On this CPU the option is a no-op with a warning (tested), so the mechanism itself — hooks, host
masters, gathering, clipping on the host, copying back, state dicts and exact resume — is run
with the "device" being the CPU by switching `offload_wanted` on. The CUDA path (side stream,
pinned buffers, freed device gradients) is tested under `@pytest.mark.gpu`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import petkit as pk
from petkit.core.errors import ConfigError
from petkit.models import tiny_model
from petkit.training import offload
from petkit.training.offload import HostOffloadOptimizer
from petkit.training.runtime import RuntimeConfig
from petkit.training.steppers import backprop


def _model(dtype: torch.dtype = torch.float32, full: bool = False) -> torch.nn.Module:
    model, _ = tiny_model("llama")
    model.to(dtype)
    if full:  # full fine-tuning: every weight trains
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    pk.attach(model, pk.LoraConfig(r=4, targets=["q_proj", "v_proj"]), seed=0)
    return model


def _data(n: int = 24) -> list[dict[str, torch.Tensor]]:
    rows = torch.randint(1, 128, (n, 10), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r} for r in rows]


def _config(**kw: Any) -> pk.TrainConfig:
    base = dict(lr=1e-2, max_steps=4, batch_size=4, grad_accum=2, progress=False,
                max_grad_norm=0.05, warmup_steps=1, schedule="cosine")  # the clip binds
    return pk.TrainConfig(**{**base, **kw})


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offload even though the parameters are on the CPU (the mechanism under test)."""
    monkeypatch.setattr(backprop, "offload_wanted", lambda params, mode: mode != "none")


@pytest.mark.parametrize("chunk_bytes", [offload.CHUNK_BYTES, 1])  # one chunk; one per tensor
def test_offloaded_training_matches_the_plain_optimiser(forced: None, chunk_bytes: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "CHUNK_BYTES", chunk_bytes)
    plain, host = _model(), _model()
    pk.train(plain, _data(), _config())
    result = pk.train(host, _data(), _config(runtime={"offload_optimizer": "cpu"}))
    a, b = _trained(plain), _trained(host)
    assert a.keys() == b.keys()
    moved = sum((b[k] - dict(_model().named_parameters())[k]).abs().sum() for k in b)
    assert moved > 0  # the offloaded run trained
    for k in a:  # fused CPU AdamW on the host vs foreach AdamW: equal to rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert result.steps == 4
    assert {"offload_gather_s", "offload_update_s", "offload_send_back_s"} <= result.report.keys()


def test_full_fine_tuning_in_bf16_keeps_fp32_masters(forced: None) -> None:
    model = _model(torch.bfloat16, full=True)
    params = dict(model.named_parameters())
    stepper = backprop.BackpropStepper(params, _config(runtime={"offload_optimizer": "cpu"}), 4)
    optimizer = stepper.optimizer
    assert isinstance(optimizer, HostOffloadOptimizer)
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in optimizer.masters)
    batch = {"input_ids": torch.randint(1, 128, (2, 8)), "labels": torch.randint(1, 128, (2, 8))}
    stepper.step([batch], lambda b: model(**b).loss)
    state = stepper.state_dict()["optimizer"]
    assert len(state["offload_master"]) == len(params)
    for master, param in zip(optimizer.masters, params.values()):  # device = rounded master
        assert torch.equal(master.to(torch.bfloat16), param.detach())
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["state"].values())


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "cpu"), (torch.bfloat16, "cpu"),
                                        (torch.bfloat16, "nvme")])
def test_resume_is_bit_exact_with_offload(tmp_path: Path, forced: None,
                                          dtype: torch.dtype, mode: str) -> None:
    cfg = dict(max_steps=6, save_every=2, keep_checkpoints=5,
               runtime={"offload_optimizer": mode, **({"offload_dir": str(tmp_path / "state")}
                                                       if mode == "nvme" else {})})
    full, part = tmp_path / "full", tmp_path / "part"
    pk.train(_model(dtype), _data(), _config(output_dir=str(full), **cfg))
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    resumed = _model(dtype)
    pk.train(resumed, _data(), _config(output_dir=str(part), resume=True, **cfg))
    again = _model(dtype)
    pk.train(again, _data(), _config(output_dir=str(tmp_path / "again"), **cfg))
    a, b = _trained(again), _trained(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (part / "metrics.jsonl").read_text().splitlines()
    assert rows == (full / "metrics.jsonl").read_text().splitlines()


def test_a_checkpoint_without_offload_resumes_with_it(tmp_path: Path, forced: None) -> None:
    cfg = dict(max_steps=4, save_every=2, keep_checkpoints=5)
    full, part = tmp_path / "full", tmp_path / "part"
    plain = _model()
    pk.train(plain, _data(), _config(output_dir=str(full), **cfg))
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    resumed = _model()
    pk.train(resumed, _data(), _config(output_dir=str(part), resume=True,
                                       runtime={"offload_optimizer": "cpu"}, **cfg))
    a, b = _trained(plain), _trained(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_writes_outside_the_optimiser_and_late_gradient_changes_are_seen() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = HostOffloadOptimizer([[weight]], lambda g: torch.optim.SGD(g[0], lr=1.0))
    (weight * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # the hook copies (1, 2, 3)
    with torch.no_grad():
        weight.grad.mul_(10)  # changed on the device after the copy: copied again
    optimizer.step()
    assert torch.equal(weight.detach(), torch.tensor([-9.0, -19.0, -29.0]))
    optimizer.zero_grad()
    with torch.no_grad():
        weight.fill_(5.0)  # a write the optimiser did not make (a per-step hook, a load)
    weight.grad = torch.ones(3)  # set directly, no backward hook (as DP does)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.full((3,), 4.0))
    optimizer.zero_grad()
    optimizer.step()  # no gradient this step (an IST-frozen layer): unchanged
    assert torch.equal(weight.detach(), torch.full((3,), 4.0))


def test_clipping_scales_the_fp32_masters_gradients(forced: None) -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    config = _config(optimizer="sgd", lr=1.0, max_grad_norm=0.5, warmup_steps=0,
                     schedule="constant", runtime={"offload_optimizer": "cpu"})
    stepper = backprop.BackpropStepper({"w": weight}, config, 1)
    stepper.step([{"x": torch.tensor([3.0, 4.0])}],  # gradient (3, 4), norm 5: clipped to 0.5
                 lambda b: (weight.float() * b["x"]).sum())
    want = torch.tensor([1.0 - 0.3, 2.0 - 0.4])
    torch.testing.assert_close(stepper.optimizer.masters[0], want, rtol=0, atol=1e-6)
    assert torch.equal(weight.detach(), want.to(torch.bfloat16))


def test_only_the_last_micro_batch_copies_and_free_grads_drops_them() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = HostOffloadOptimizer([[weight]], lambda g: torch.optim.SGD(g[0], lr=1.0),
                                     free_grads=True)
    optimizer.final = False
    weight.sum().backward()
    assert weight.grad is not None and not optimizer.sent  # accumulating: nothing copied
    optimizer.final = True
    weight.sum().backward()  # the step's last backward: copied (grad 2), device grad freed
    assert weight.grad is None and torch.equal(optimizer.buffers[0], torch.full((2,), 2.0))
    optimizer.step()
    assert torch.equal(weight.detach(), torch.full((2,), -1.0))


def test_on_the_cpu_the_option_is_a_no_op_with_a_warning() -> None:
    plain, asked = _model(), _model()
    pk.train(plain, _data(), _config())
    with pytest.warns(UserWarning, match="no effect here: the trained parameters are on the CPU"):
        pk.train(asked, _data(), _config(runtime={"offload_optimizer": "cpu"}))
    a, b = _trained(plain), _trained(asked)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refusals() -> None:
    with pytest.raises(ConfigError, match=r"offload_optimizer.*one of \('none', 'cpu', 'nvme'\)"):
        RuntimeConfig(offload_optimizer="gpu")
    with pytest.raises(ConfigError, match="offload_dir.*with offload_optimizer=nvme"):
        RuntimeConfig(offload_optimizer="cpu", offload_dir="/tmp/x")
    with pytest.raises(ConfigError, match="not to the 'zo' stepper of --optimizer mezo"):
        pk.TrainConfig(optimizer="mezo", runtime={"offload_optimizer": "cpu"})


def test_nvme_keeps_masters_and_state_in_files_and_trains_as_cpu_does(tmp_path: Path,
                                                                      forced: None) -> None:
    """nvme: every master and optimiser state tensor (but scalars) is a memory-mapped file in
    --runtime.offload_dir, unlinked at once (the folder stays empty); the updates are the cpu
    mode's bit for bit."""
    from petkit.training.file_store import file_backed

    folder = tmp_path / "state"
    host, disk = _model(torch.bfloat16, full=True), _model(torch.bfloat16, full=True)
    params = dict(disk.named_parameters())
    runtime = {"offload_optimizer": "nvme", "offload_dir": str(folder)}
    stepper = backprop.BackpropStepper(params, _config(runtime=runtime), 4)
    optimizer = stepper.optimizer
    assert isinstance(optimizer, HostOffloadOptimizer)
    assert all(file_backed(m) for m in optimizer.masters if m.numel() > 1)
    batch = {"input_ids": torch.randint(1, 128, (2, 8)), "labels": torch.randint(1, 128, (2, 8))}
    stepper.step([batch], lambda b: disk(**b).loss)
    tensors = [v for s in optimizer.state.values() for v in s.values() if v.numel() > 1]
    assert len(tensors) == 2 * len(params) and all(file_backed(t) for t in tensors)
    assert optimizer.report()["offload_optimizer"] == "nvme"
    assert folder.is_dir() and not list(folder.iterdir())  # nothing left behind
    cpu = backprop.BackpropStepper(dict(host.named_parameters()),
                                   _config(runtime={"offload_optimizer": "cpu"}), 4)
    cpu.step([batch], lambda b: host(**b).loss)
    for (name, a), b in zip(host.named_parameters(), params.values()):
        assert torch.equal(a, b), name


def test_a_full_or_unwritable_drive_is_a_clear_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from petkit.training.file_store import FileStore

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = FileStore(str(tmp_path / "state"))
    kept = store.copy(torch.ones(4))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ConfigError, match=r"offload_dir .*cannot hold .*No space left"):
        store.copy(torch.ones(1024))
    assert not list((tmp_path / "state").iterdir()) and kept.sum() == 4
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="offload_dir .*cannot create it"):
        FileStore(str(tmp_path / "a-file" / "under"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_matches_plain_and_resumes_exactly(tmp_path: Path) -> None:
    def run(offload: str, out: Path, **kw: Any) -> dict[str, torch.Tensor]:
        model = _model(full=True).cuda()
        cfg = _config(output_dir=str(out), runtime={"offload_optimizer": offload,
                                                     "device": "cuda", "precision": "fp32"}, **kw)
        result = pk.train(model, _data(), cfg, parameters=dict(model.named_parameters()))
        assert result.report.get("offload_optimizer", "none") == offload
        return _trained(model)
    cfg = dict(max_steps=4, save_every=2, keep_checkpoints=5)
    plain = run("none", tmp_path / "plain", **cfg)
    host = run("cpu", tmp_path / "host", **cfg)
    for k in plain:  # fused CPU AdamW on the host vs fused CUDA AdamW: equal to rounding
        torch.testing.assert_close(host[k].cpu(), plain[k].cpu(), rtol=1e-4, atol=1e-5)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "host" / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    resumed = run("cpu", part, resume=True, **cfg)
    assert all(torch.equal(host[k], resumed[k]) for k in host)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_lives_on_the_host_and_device_gradients_are_freed() -> None:
    model = _model(torch.bfloat16, full=True).cuda()
    params = dict(model.named_parameters())
    config = _config(runtime={"offload_optimizer": "cpu", "device": "cuda"})
    stepper = backprop.BackpropStepper(params, config, 4)
    host = stepper.optimizer
    assert isinstance(host, HostOffloadOptimizer) and host.stream is not None
    batch = {k: v.cuda() for k, v in {"input_ids": torch.randint(1, 128, (2, 8)),
                                       "labels": torch.randint(1, 128, (2, 8))}.items()}
    seen: list[bool] = []
    stepper.step([batch, batch], lambda b: seen.append(host.final) or model(**b).loss)
    assert seen == [False, True]  # only the last micro-batch's gradients went to the host
    model(**batch).loss.backward()  # host.final: each gradient is copied out, then freed
    assert all(p.grad is None for p in params.values()) and len(host.sent) == len(params)
    host.step()
    assert all(t.device.type == "cpu" for s in host.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
    torch.cuda.synchronize()
    for master, param in zip(host.masters, params.values()):
        assert master.device.type == "cpu" and master.dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), param.detach().cpu())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cpu", "nvme"])
def test_cli_run_on_the_cpu_warns_once_and_trains(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  mode: str) -> None:
    from toys import save_tiny_llama

    from petkit.cli import main

    model = save_tiny_llama(tmp_path / "tiny")
    where = [f"--runtime.offload_dir={tmp_path / 'state'}"] if mode == "nvme" else []
    with pytest.warns(UserWarning, match=f"offload_optimizer={mode} has no effect here"):
        assert main(["train", "--model", model, "--data", "rotten-tomatoes", "--steps", "2",
                     "--train-size", "16", "--test-size", "8", "--max-length", "24",
                     "--batch-size", "4", "--train.progress=false", "--device", "cpu",
                     f"--runtime.offload_optimizer={mode}", *where,
                     "--output", str(tmp_path / "run")]) == 0
    assert f"offload_optimizer: {mode}" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_a_full_fine_tune_with_an_output_folder_saves_its_trained_tensors(tmp_path: Path) -> None:
    """No adapter attached, `parameters=` given: the run ends by writing those tensors (it
    crashed asking for adapter 'default' before)."""
    from safetensors.torch import load_file
    model = _model(full=True)
    result = pk.train(model, _data(), _config(output_dir=str(tmp_path)),
                      parameters=dict(model.named_parameters()))
    saved = load_file(Path(result.adapter_path) / "trained.safetensors")
    assert saved.keys() == _trained(model).keys()
    assert all(torch.equal(saved[k], v) for k, v in _trained(model).items())
