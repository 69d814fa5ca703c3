"""Optimiser updates on the host (`--runtime.offload_optimizer=cpu|nvme`; docs/offload.md).

The accelerator keeps only the trained weights (and their gradients until they have been copied
out); an fp32 master copy of every trained parameter, the optimiser's state and the update live in
host memory. Per parameter, a post-accumulate-grad hook copies the gradient to a pinned host
buffer on a side CUDA stream as soon as backward has produced it on the last micro-batch of a
step, so the copies overlap the rest of the backward, and frees the device gradient. `step()`
waits for the copies, runs the wrapped torch optimiser (fused CPU AdamW by default) on the
masters, and copies the updated weights back on the side stream; the next forward waits for them
on the device, not on the host.

Everything a plain torch optimiser holds is the inner optimiser's: `param_groups` (so learning-rate
schedulers work), `state`, and a `state_dict` of the same layout. When a parameter's device dtype
is not fp32 (a bf16 model), the fp32 masters are added to the state dict, so a resumed run
continues from the same fp32 weights, exactly. With `nvme` the masters and the state are
memory-mapped files (`file_store.FileStore`, in `--runtime.offload_dir`): the same updates, with
the operating system's page cache holding in host memory what fits.

Writes to a trained parameter made outside the optimiser (a method's per-step hook, a checkpoint
load) are noticed through the tensor's version counter and copied into the master before the next
update. Gradients changed on the device after they were copied (clipping, per-example DP noise)
are copied again; the backprop stepper clips on the host instead (`clip_params`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from petkit.core.errors import ConfigError
from petkit.training.file_store import FileStore, file_backed

OFFLOAD_MODES = ("none", "cpu", "nvme")

CHUNK_BYTES = 256 * 2**20  # host update and copy-back overlap in chunks of this many master bytes
BuildFn = Callable[[list[list[torch.Tensor]]], torch.optim.Optimizer]


def offload_wanted(params: Sequence[nn.Parameter], mode: str) -> bool:
    """Whether `--runtime.offload_optimizer=mode` moves the optimiser for these parameters: only
    from an accelerator. On the CPU it is a no-op (the state already lives in host memory)."""
    if mode == "none":
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError(f"--runtime.offload_optimizer={mode} runs in one process: under torchrun, "
                          "--runtime.distributed=fsdp shards the optimiser state instead")
    if all(p.device.type == "cpu" for p in params):
        warnings.warn(f"--runtime.offload_optimizer={mode} has no effect here: the trained "
                      "parameters are on the CPU, where the optimiser state already lives",
                      UserWarning, stacklevel=2)
        return False
    return True


class HostOffloadOptimizer(torch.optim.Optimizer):
    """A torch optimiser over host fp32 masters of device parameters (module docstring).

    Subclasses `Optimizer` so learning-rate schedulers accept it; `Optimizer.__init__` is not
    called: `param_groups`, `state` and `defaults` are the inner optimiser's."""

    def __init__(self, groups: list[list[nn.Parameter]], build: BuildFn, *,
                 free_grads: bool | None = None, store: FileStore | None = None) -> None:
        """`build(master_groups)` makes the inner optimiser; `free_grads` (default: on CUDA)
        drops a device gradient once its copy is queued; with `store` (nvme) the masters and the
        optimiser's state live in its files, host memory caching what fits."""
        self.store = store
        self.params = [p for group in groups for p in group]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.free_grads = cuda if free_grads is None else free_grads
        with torch.no_grad():
            self.masters = [_master(p) for p in self.params]
            if store is not None:
                self.masters = [store.copy(m) if m.numel() > 1 else m for m in self.masters]
        # one pinned buffer per parameter in its device dtype: gradients out, weights back in
        self.buffers = [torch.empty(p.shape, dtype=p.dtype, pin_memory=cuda) for p in self.params]
        # fp32 gradients of the masters where the device dtype differs (kept: no page faults a step)
        self.host_grads = [b if b.dtype == m.dtype else torch.empty_like(m)
                           for b, m in zip(self.buffers, self.masters)]
        self.sent: dict[int, tuple[torch.cuda.Event | None, int]] = {}  # index -> (copy done, grad version)
        self.versions = [p._version for p in self.params]
        self.final = True  # the stepper sets False during earlier micro-batches of a step
        self.seconds = {"gather": 0.0, "update": 0.0, "send_back": 0.0}  # host time, all steps
        self.steps = 0
        self.gathered = False  # this step's gradients are on the masters (clip, then step)
        self.chunks = _chunks(self.masters, CHUNK_BYTES)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                        for i, p in enumerate(self.params)]
        where = {id(p): m for p, m in zip(self.params, self.masters)}
        self.inner = build([[where[id(p)] for p in group] for group in groups])
        self.defaults = self.inner.defaults

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimiser's groups (learning rates, betas) over the masters."""
        return self.inner.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The inner optimiser's per-master state (exp_avg, exp_avg_sq, step)."""
        return self.inner.state

    def close(self) -> None:
        """Remove the gradient hooks (the optimiser is being replaced)."""
        for handle in self.handles:
            handle.remove()

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if self.final and param.grad is not None:
                self._send(index, free=self.free_grads)
        return hook

    def _send(self, index: int, free: bool) -> None:
        """Queue the copy of parameter `index`'s gradient into its host buffer."""
        param, buffer = self.params[index], self.buffers[index]
        grad = param.grad
        assert grad is not None
        if self.stream is None:
            buffer.copy_(grad)
            self.sent[index] = (None, grad._version)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buffer.copy_(grad, non_blocking=True)
                event = self.stream.record_event()
            self.sent[index] = (event, grad._version)
            if free:
                grad.record_stream(self.stream)
        if free:
            param.grad = None

    @torch.no_grad()
    def gather(self) -> None:
        """Every parameter's gradient on its master (None where there is none this step);
        masters of parameters written outside the optimiser are refreshed first. Once a step."""
        if self.gathered:
            return
        self.gathered = True
        started = time.perf_counter()
        for i, (param, master) in enumerate(zip(self.params, self.masters)):
            if param._version != self.versions[i]:
                master.copy_(param)
                self.versions[i] = param._version
            grad, sent = param.grad, self.sent.get(i)
            if grad is not None and (sent is None or sent[1] != grad._version):
                self._send(i, free=False)  # no hook ran (DP sets .grad) or changed since
            sent = self.sent.get(i)
            if sent is None:
                master.grad = None
                continue
            if sent[0] is not None:
                sent[0].synchronize()
            grad = self.host_grads[i]
            if grad is not self.buffers[i]:
                grad.copy_(self.buffers[i])
            master.grad = grad
        self.seconds["gather"] += time.perf_counter() - started

    def clip_params(self) -> list[torch.Tensor]:
        """The tensors whose `.grad` a global-norm clip should scale: the masters, gathered."""
        self.gather()
        return self.masters

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Update the masters on the host and copy them back to the device, chunk by chunk: the
        copies of one chunk run on the side stream while the host updates the next. (A per-element
        optimiser updates a parameter the same way whichever others have gradients.)"""
        assert closure is None, "closures are not supported"
        self.gather()
        if self.stream is not None:  # the weights are overwritten after the device is done with them
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        grads = [m.grad for m in self.masters]
        for master in self.masters:
            master.grad = None
        for chunk in self.chunks:
            live = [i for i in chunk if grads[i] is not None]
            if not live:
                continue
            started = time.perf_counter()
            for i in live:
                self.masters[i].grad = grads[i]
            self.inner.step()
            updated = time.perf_counter()
            for i in live:
                self.masters[i].grad = None
                self._send_back(i)
            self.seconds["update"] += updated - started
            self.seconds["send_back"] += time.perf_counter() - updated
        if self.stream is not None:  # the next forward waits on the device, not the host
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._spill()
        self.steps += 1
        self.sent.clear()
        self.gathered = False

    def _send_back(self, index: int) -> None:
        """Parameter `index`'s updated master into its device weight (queued on the side stream)."""
        param, buffer = self.params[index], self.buffers[index]
        buffer.copy_(self.masters[index])
        if self.stream is None:
            param.copy_(buffer)
        else:
            with torch.cuda.stream(self.stream):
                param.copy_(buffer, non_blocking=True)
        self.versions[index] = param._version

    @torch.no_grad()
    def _spill(self) -> None:
        """With a store: state tensors the inner optimiser made (its first step, a loaded state
        dict) moved into files; the optimiser updates them in place from then on."""
        if self.store is None:
            return
        for state in self.inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.numel() > 1 and not file_backed(value):
                    state[key] = self.store.copy(value)

    def report(self) -> dict[str, Any]:
        """What the run reports: the mode and the host's mean seconds per step in each phase
        (gradients to fp32 masters, the optimiser's update, weights queued back)."""
        per_step = {f"offload_{k}_s": round(v / max(self.steps, 1), 4) for k, v in self.seconds.items()}
        where = "cpu" if self.store is None else "nvme"
        return {"offload_optimizer": where, **per_step}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the device gradients and the masters'."""
        for param in self.params:
            param.grad = None
        self.inner.zero_grad(set_to_none=True)
        self.sent.clear()
        self.gathered = False

    def state_dict(self) -> dict[str, Any]:
        """The inner optimiser's state dict; plus the fp32 masters where they are more precise
        than the device weights (`offload_master`)."""
        state = self.inner.state_dict()
        if any(m.dtype != p.dtype for m, p in zip(self.masters, self.params)):
            state["offload_master"] = [m.detach().clone() for m in self.masters]
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the inner state; masters from the saved ones, else from the device weights
        (a checkpoint of a run without offload)."""
        state = dict(state_dict)
        saved = state.pop("offload_master", None)
        for i, (param, master) in enumerate(zip(self.params, self.masters)):
            master.copy_(param if saved is None else saved[i])
            self.versions[i] = param._version
        self.inner.load_state_dict(state)
        self._spill()


def _master(param: nn.Parameter) -> torch.Tensor:
    """An fp32 host copy of `param` (its own dtype if not floating point), a leaf."""
    dtype = torch.float32 if param.dtype.is_floating_point else param.dtype
    return param.detach().to("cpu", dtype, copy=True)


def _chunks(masters: Sequence[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's masters hold about `limit` bytes."""
    chunks: list[list[int]] = [[]]
    size = 0
    for i, master in enumerate(masters):
        if chunks[-1] and size + master.nbytes > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += master.nbytes
    return chunks
