"""What a cell trains: a petkit method, full fine-tuning, or the `peft` package's twin of a method.

Every arm answers the same three questions, so the cell runner never branches on the kind:
`setup` (the module to train and evaluate), `parameters` (what the optimiser updates) and `save`
(what a user would keep on disk). Full fine-tuning is a baseline of the harness, not a method:
it trains every parameter of the base and saves them all; linear probing trains the new head
alone. A petkit arm with `pretrain` (PVP) starts from a source run's delta, head excluded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from petkit.core.disk_full import write_tensors
from petkit.benchmark.spec import ArmSpec
from petkit.compress.prune import PruneConfig, finish_pruning, start_pruning
from petkit.core.capabilities import InputScaled
from petkit.core.delta import iter_deltas
from petkit.core.errors import ConfigError, MissingPackageError
from petkit.core.io import adapter_state, save_adapter
from petkit.core.model import activate, attach, detach, trainable_parameters
from petkit.core.registry import get_method, make_config
from petkit.core.state import adapters
from petkit.models.quantize import quantize


@dataclass(frozen=True)
class ArmContext:
    """What an arm needs to know about the cell: task type, new head modules, seed."""

    task_type: str  # verbaliser | head | instruction
    head_modules: tuple[str, ...]
    seed: int
    init: Mapping[str, torch.Tensor] | None = None  # pre-trained delta tensors (PVP)
    total_steps: int | None = None  # the cell's optimiser steps (PEFT's AdaLoRA schedule needs it)


class Arm(Protocol):
    """A way of training a model in the grid."""

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """Prepare `model` (in place where possible); return the module to train/evaluate."""
        ...

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the optimiser updates, by name."""
        ...

    def save(self, model: nn.Module, path: Path) -> None:
        """Write what a user keeps after training to the folder `path`."""
        ...


def petkit_config(spec: ArmSpec, ctx: ArmContext, with_head: bool = True) -> Any:
    """The arm's method config: the cell's seed where the method has one; on a head task (and
    `with_head`) it also trains the new head (`modules_to_save`)."""
    assert spec.method is not None
    fields = dict(spec.options)
    config_cls = get_method(spec.method).config_cls
    if "seed" in {f.name for f in dataclasses.fields(config_cls)} and "seed" not in fields:
        fields["seed"] = ctx.seed
    if ctx.task_type == "head" and with_head:
        fields["modules_to_save"] = [*fields.get("modules_to_save", ()),
                                     *[m for m in ctx.head_modules
                                       if m not in fields.get("modules_to_save", ())]]
    return make_config(spec.method, **fields)


class PetkitArm:
    """A registered petkit method, attached with `pk.attach`."""

    def __init__(self, spec: ArmSpec) -> None:
        """Arm for `spec.method` with `spec.options`."""
        self.spec = spec

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """Attach the method (its init drawn from the cell's seed, or `ctx.init`'s tensors), and
        the stacked methods after it, all active."""
        torch.manual_seed(ctx.seed)
        attach(model, petkit_config(self.spec, ctx))
        if ctx.init is not None:
            start_from(model, ctx.init)
        for entry in self.spec.stack:
            spec = ArmSpec(entry["adapter"], "petkit", entry["name"], entry["options"])
            attach(model, petkit_config(spec, ctx, with_head=False), name=entry["adapter"])
        if self.spec.stack:
            activate(model, ["default", *(entry["adapter"] for entry in self.spec.stack)])
        return model

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The active adapters' trainable parameters."""
        return trainable_parameters(model)

    def save(self, model: nn.Module, path: Path) -> None:
        """`pk.save_adapter`; a stacked arm's adapters each in their own folder under `path`."""
        if not self.spec.stack:
            save_adapter(model, path)
            return
        for name in ("default", *(entry["adapter"] for entry in self.spec.stack)):
            save_adapter(model, path / name, name=name)


@runtime_checkable
class Finishing(Protocol):
    """An arm that changes the model after training, before it is tested (pruning slices it)."""

    def finish(self, model: nn.Module) -> nn.Module:
        """The model to test and save."""
        ...

    def untrained_parameters(self) -> int:
        """Of the parameters the arm handed to training, how many never trained (after
        `finish`; e.g. APT's LoRA ranks that stayed closed)."""
        ...


class CompressedArm(PetkitArm):
    """A petkit method over a compressed base: quantised before attaching (QLoRA, int8 LoRA), or
    pruned while it trains (LoRAPrune, APT), after which the merged, sliced model is tested and
    saved as a Hugging Face folder."""

    report: dict[str, Any] = {}

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """Quantise, attach, start pruning: as the spec says."""
        if self.spec.quantize:
            quantize(model, self.spec.quantize)
        model = super().setup(model, ctx)
        if self.spec.prune:
            start_pruning(model, PruneConfig(**self.spec.prune))
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        """`finish_pruning` (merge the LoRA, slice the pruned heads and channels) when pruning."""
        if self.spec.prune:
            self.report = finish_pruning(model)  # what was kept; APT's live LoRA parameters
        return model

    def untrained_parameters(self) -> int:
        """APT's LoRA parameters in ranks that never opened (0 for every other arm)."""
        live, allocated = (self.report.get(f"apt_{k}_lora_parameters") for k in ("live", "allocated"))
        return allocated - live if live is not None and allocated is not None else 0

    def save(self, model: nn.Module, path: Path) -> None:
        """The adapter; a pruned arm saves the pruned model (`save_pretrained`)."""
        if self.spec.prune:
            model.save_pretrained(path)
        else:
            super().save(model, path)


def transferable_state(model: nn.Module, head_modules: tuple[str, ...],
                       name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s delta tensors without those of the new head (copies, by key)."""
    heads = tuple(f"{h}." for h in head_modules)
    return {k: v.detach().clone() for k, v in adapter_state(model, name).items()
            if not k.startswith(heads)}


def start_from(model: nn.Module, tensors: Mapping[str, torch.Tensor],
               name: str = "default") -> None:
    """Copy pre-trained delta tensors into the attached adapter (every key must fit)."""
    state = adapter_state(model, name)
    missing = sorted(set(tensors) - set(state))
    if missing:
        raise ConfigError(f"pre-trained delta has tensors the arm's adapter lacks: {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if state[key].shape != value.shape:
                raise ConfigError(f"pre-trained tensor {key} has shape {tuple(value.shape)}, "
                                  f"the arm's {tuple(state[key].shape)}")
            state[key].copy_(value)


class LinearProbeArm:
    """Linear probing: the base stays frozen; only the task's new head trains and is saved."""

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """Freeze everything but the head modules."""
        if not ctx.head_modules:
            raise ConfigError("the linear-probe baseline trains a new classification head; this "
                              f"task ({ctx.task_type}) has none (use a task_type: head task)")
        model.requires_grad_(False)
        for path in ctx.head_modules:
            model.get_submodule(path).requires_grad_(True)
        return model

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The head's parameters."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, path: Path) -> None:
        """The head's weights as one safetensors file."""
        path.mkdir(parents=True, exist_ok=True)
        write_tensors(path / "head.safetensors", self.parameters(model))


class FullArm:
    """Full fine-tuning: every parameter of the base trains; the whole model is saved."""

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """Unfreeze everything."""
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """All parameters (tied weights once)."""
        return dict(model.named_parameters())

    def save(self, model: nn.Module, path: Path) -> None:
        """All weights as one safetensors file."""
        path.mkdir(parents=True, exist_ok=True)
        write_tensors(path / "model.safetensors", dict(model.named_parameters()))


class PeftCausalView(nn.Module):
    """A peft causal-LM model seen with petkit's calling convention.

    Prompt tuning in peft returns logits for its virtual tokens too; this view drops them (or
    shifts `logits_to_keep` past them), so the verbaliser reads the caller's last token.
    """

    def __init__(self, peft_model: nn.Module, shift: int) -> None:
        """`shift`: virtual tokens peft puts in front of the sequence (0 unless prompt tuning)."""
        super().__init__()
        self.peft_model = peft_model
        self.shift = shift

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                logits_to_keep: torch.Tensor | int | None = None) -> Any:
        """peft's forward; logits aligned with `input_ids`."""
        kwargs: dict[str, Any] = {}
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep + self.shift \
                if isinstance(logits_to_keep, torch.Tensor) else logits_to_keep
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              **kwargs)
        if logits_to_keep is None and self.shift and out.logits.shape[1] == \
                input_ids.shape[1] + self.shift:
            out.logits = out.logits[:, self.shift:]
        return out


def _targets_of(model: nn.Module, config: Any) -> tuple[list[str], list[str]]:
    """Where petkit would put `config`: (all touched paths, paths scaled at their input)."""
    attach(model, config, name="_placement")
    try:
        record = adapters(model)["_placement"]
        on_input = [p for p, w in iter_deltas(model)
                    if w.adapter_name == "_placement" and isinstance(w, InputScaled) and w.on_input]
        return list(record.targets), on_input
    finally:
        detach(model, "_placement")


def _peft() -> Any:
    """The `peft` package (optional: only the benchmark's PEFT arm needs it)."""
    try:
        import peft
    except ImportError as err:
        raise MissingPackageError("the benchmark's PEFT arm needs the peft package: "
                                  "pip install peft") from err
    return peft


def peft_config(method: str, config: Any, model: nn.Module, task_type: str) -> Any:
    """The `peft` config matching petkit's `config` (same sizes, same placement)."""
    peft = _peft()

    kind = peft.TaskType.SEQ_CLS if task_type == "head" else peft.TaskType.CAUSAL_LM
    if method in ("prompt", "prefix"):
        n = config.num_virtual_tokens
        if method == "prefix":
            hidden = int(getattr(config, "projection_dim", 0) or 0)  # > 0: MLP reparameterisation
            return peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=n,
                                           prefix_projection=hidden > 0,
                                           encoder_hidden_size=hidden or None)
        init = peft.PromptTuningInit.SAMPLE_VOCAB if getattr(config, "init", "") == "vocab" \
            else peft.PromptTuningInit.RANDOM
        return peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=n,
                                       prompt_tuning_init=init)
    targets, on_input = _targets_of(model, config)
    if method == "lora":
        return peft.LoraConfig(task_type=kind, r=config.r, lora_alpha=config.alpha,
                               lora_dropout=config.dropout, use_rslora=config.rslora,
                               target_modules=targets)
    if method == "ia3":
        return peft.IA3Config(task_type=kind, target_modules=targets,
                              feedforward_modules=on_input)
    layout = type(config).peft_layout  # any other method PEFT has: the fields its export writes
    if layout is None:
        raise ConfigError(f"no peft twin for method {method!r}")
    return peft.get_peft_config({"peft_type": layout.peft_type, "task_type": kind,
                                 "target_modules": layout.target_names(targets), **layout.to_peft(config)})


def _peft_allocation(peft_model: nn.Module) -> Any:
    """PEFT's AdaLoRA moves rank only when the training loop calls its `update_and_allocate`
    after each optimiser step, before the gradients are cleared (PEFT's documented loop); the
    harness's loop knows nothing of PEFT, so an optimiser post-step hook makes that call, for the
    optimiser that trains this model only. Returns the hook's handle (None for other methods)."""
    tuner = peft_model.base_model
    if not isinstance(tuner, _peft().AdaLoraModel):
        return None
    mine = [p for p in peft_model.parameters() if p.requires_grad]
    steps = iter(range(2**62))

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if any(p is mine[0] for p in params):
            tuner.update_and_allocate(next(steps))

    from torch.optim.optimizer import register_optimizer_step_post_hook

    return register_optimizer_step_post_hook(after_step)


class PeftArm:
    """The `peft` package's implementation of a petkit method, on the same base and data."""

    def __init__(self, spec: ArmSpec) -> None:
        """Twin of `spec.method` with the same options."""
        self.spec = spec

    def setup(self, model: nn.Module, ctx: ArmContext) -> nn.Module:
        """`peft.get_peft_model`; a causal model is wrapped in `PeftCausalView`."""
        peft = _peft()

        assert self.spec.method is not None
        config = petkit_config(self.spec, ctx, with_head=False)  # peft adds the head itself
        # the twin's config first: finding its targets attaches petkit's method, which draws, so
        # seeding after it starts PEFT's draws where the petkit arm's start
        twin = peft_config(self.spec.method, config, model, ctx.task_type)
        if isinstance(twin, peft.AdaLoraConfig) and ctx.total_steps:
            twin.total_step = ctx.total_steps  # its budget schedule spans the cell's steps
        torch.manual_seed(ctx.seed)
        peft_model = peft.get_peft_model(model, twin)
        self.allocation = _peft_allocation(peft_model)
        if ctx.task_type == "head":
            return peft_model
        shift = config.num_virtual_tokens if self.spec.method == "prompt" else 0
        return PeftCausalView(peft_model, shift)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Whatever peft left trainable (its adapter, and the head for classification)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def finish(self, model: nn.Module) -> nn.Module:
        """Training is over: PEFT's rank allocation (AdaLoRA) stops."""
        if getattr(self, "allocation", None) is not None:
            self.allocation.remove()
            self.allocation = None
        return model

    def untrained_parameters(self) -> int:
        """0: PEFT's twin trains what it hands to the optimiser."""
        return 0

    def save(self, model: nn.Module, path: Path) -> None:
        """peft's `save_pretrained`."""
        inner = model.peft_model if isinstance(model, PeftCausalView) else model
        inner.save_pretrained(str(path))


def make_arm(spec: ArmSpec) -> Arm:
    """The arm object for a spec."""
    if spec.kind == "petkit":
        return CompressedArm(spec) if spec.quantize or spec.prune else PetkitArm(spec)
    if spec.kind == "full":
        return FullArm()
    if spec.kind == "linear-probe":
        return LinearProbeArm()
    if spec.kind == "peft":
        return PeftArm(spec)
    raise ConfigError(f"unknown arm kind {spec.kind!r}; expected petkit, full, linear-probe or peft")
