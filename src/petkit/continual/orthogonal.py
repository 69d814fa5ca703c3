"""Stacked low-rank adapters with frozen predecessors: O-LoRA and InfLoRA.

Both keep one LoRA per task; once a task is learned its adapter is frozen (`set_trainable`
False, so its tensors never change again) and every learned adapter stays active, summed, at
test time: no task id is needed.

- O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual
  Learning"): the new adapter's A rows are pushed orthogonal to the earlier adapters' A rows,

      L = CE + w * mean_{layers, old} mean_{i,j} cos(A_new[i], A_old[j])^2

  Each term is a squared cosine, in [0, 1] whatever the rank, width or number of layers, so the
  weight `w` (default 1) means the same on every model and does not swamp the task loss (the
  paper's raw sum |A_new A_old^T| grows with r^2 and the layer count: O-LoRA #33).
- InfLoRA (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation"): the
  paper's fixed dimension-reduction matrix (its B_t, r x d_in) is petkit's `lora_A`; its trained
  A_t is petkit's `lora_B`. Before task t, `lora_A` is set to the top-r right singular vectors of
  the task's layer inputs with the old tasks' input space M removed, so
      dW_t M = s * B_t (A_t M) = 0       (the update cannot touch old tasks' inputs)
  and only `lora_B` (and the task's head) trains. After the task, M grows by the directions that
  hold `threshold` of the task's input energy (GPM, Saha et al., 2021), leaving at least r free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from petkit.continual.model import batches
from petkit.continual.strategy import Strategy
from petkit.core.capabilities import LowRank, capable_text
from petkit.core.delta import DeltaModule
from petkit.core.errors import ConfigError
from petkit.core.model import activate, set_trainable, trainable_parameters
from petkit.core.state import wrappers_of

INPUT_SAMPLES = 64  # examples whose token inputs define a task's input space


def lowrank_wrappers(model: nn.Module, name: str, strategy: str) -> dict[str, DeltaModule]:
    """{path: wrapper} of adapter `name`'s low-rank wrappers; ConfigError when it has none."""
    found = {path: w for path, w in wrappers_of(model, [name]) if isinstance(w, LowRank)}
    if not found:
        raise ConfigError(f"strategy {strategy!r} needs a low-rank method (its delta is B @ A): "
                          f"{capable_text(LowRank)}")
    return found


class Stacked(Strategy):
    """A LoRA per task; earlier ones frozen and active; all summed at test time."""

    def learn(self, task: int) -> None:
        name = f"task{task}"
        self.add_adapter(name, [task])
        activate(self.model, [f"task{j}" for j in range(task + 1)])
        parameters = self.prepare(task, name)
        try:
            self.fit(self.ctx.train_sets[task], range(task + 1), task, parameters=parameters)
        finally:
            self.model.penalty = None
        self.finish(task, name)
        set_trainable(self.model, name, False)

    def prepare(self, task: int, name: str) -> dict[str, nn.Parameter] | None:
        """Set up the task's training; the parameters to train (None: the active adapters')."""
        return None

    def finish(self, task: int, name: str) -> None:
        """After the task's training, before its adapter is frozen."""


def orthogonality(new: dict[str, DeltaModule], old: Sequence[dict[str, DeltaModule]]
                  ) -> torch.Tensor:
    """Mean squared cosine between the new A rows and earlier A rows, over layers and tasks."""
    terms = []
    for path, wrapper in new.items():
        a_new = F.normalize(wrapper.lowrank()[0], dim=1)
        for earlier in old:
            if path in earlier:
                a_old = F.normalize(earlier[path].lowrank()[0].detach(), dim=1)
                terms.append((a_new @ a_old.T).pow(2).mean())
    return torch.stack(terms).mean()


class OLora(Stacked):
    """O-LoRA: orthogonality loss (normalised, weight `ortho_weight`) against earlier A's."""

    name = "o-lora"

    def prepare(self, task: int, name: str) -> dict[str, nn.Parameter] | None:
        if task == 0:
            return None
        new = lowrank_wrappers(self.model, name, self.name)
        old = [lowrank_wrappers(self.model, f"task{j}", self.name) for j in range(task)]
        weight = float(self.ctx.options.get("ortho_weight", 1.0))
        self.model.penalty = lambda: weight * orthogonality(new, old)
        self.report.setdefault("orthogonality_start", []).append(
            float(orthogonality(new, old).detach()))
        self._pair = (new, old)
        return None

    def finish(self, task: int, name: str) -> None:
        if task > 0:
            self.report.setdefault("orthogonality_end", []).append(
                float(orthogonality(*self._pair).detach()))


@torch.no_grad()
def layer_inputs(model: nn.Module, wrappers: dict[str, DeltaModule], examples: Sequence[dict],
                 pad_id: int) -> dict[str, torch.Tensor]:
    """{path: (tokens, in)}: what each wrapper receives on `examples`' real (unpadded) tokens."""
    found: dict[str, list[torch.Tensor]] = {path: [] for path in wrappers}
    mask: list[torch.Tensor] = []

    def hook(path: str):
        def grab(module: nn.Module, args: tuple) -> None:
            found[path].append(args[0][mask[0].bool()].detach().float().cpu())
        return grab

    handles = [w.register_forward_pre_hook(hook(path)) for path, w in wrappers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches(list(examples[:INPUT_SAMPLES]), 16, pad_id):
            mask[:] = [batch["attention_mask"]]
            model(batch["input_ids"], batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {path: torch.cat(rows) for path, rows in found.items()}


def project_out(rows: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """`rows` (n, d) minus their component in span(basis) (d, k, orthonormal columns)."""
    if basis is None or basis.shape[1] == 0:
        return rows
    return rows - (rows @ basis) @ basis.T


def orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the same space as `rows` (r, d)."""
    q, _ = torch.linalg.qr(rows.T)
    return q.T.contiguous()


def extend_basis(basis: torch.Tensor | None, inputs: torch.Tensor, threshold: float,
                 limit: int) -> torch.Tensor:
    """GPM: add the fewest directions of `inputs` so span(basis) holds `threshold` of their
    energy; never more than `limit` columns in all."""
    dim = inputs.shape[1]
    basis = inputs.new_zeros(dim, 0) if basis is None else basis
    residual = project_out(inputs, basis)
    total = float(inputs.pow(2).sum())
    need = threshold * total - (total - float(residual.pow(2).sum()))
    _, sing, vh = torch.linalg.svd(residual, full_matrices=False)
    energy = torch.cumsum(sing.pow(2), 0)
    count = 0 if need <= 0 else int((energy < need).sum()) + 1
    count = max(0, min(count, limit - basis.shape[1], vh.shape[0]))
    if count == 0:
        return basis
    return orthonormal_rows(torch.cat([basis.T, vh[:count]])).T


class InfLora(Stacked):
    """InfLoRA: `lora_A` fixed orthogonal to earlier tasks' input space; only `lora_B` trains."""

    name = "inflora"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bases: dict[str, torch.Tensor] = {}

    def prepare(self, task: int, name: str) -> dict[str, nn.Parameter] | None:
        wrappers = lowrank_wrappers(self.model, name, self.name)
        inputs = layer_inputs(self.model, wrappers, self.ctx.train_sets[task], self.ctx.pad_id)
        fixed = set()
        for path, wrapper in wrappers.items():
            lora_a = wrapper.lowrank()[0]
            basis = self.bases.get(path)
            _, _, vh = torch.linalg.svd(project_out(inputs[path], basis), full_matrices=False)
            design = vh[: lora_a.shape[0]]
            if design.shape[0] < lora_a.shape[0]:  # fewer tokens than the rank: pad at random
                extra = torch.randn(lora_a.shape[0] - design.shape[0], design.shape[1])
                design = torch.cat([design, extra])
            # Projecting again after the QR keeps A exactly (to float error) outside span(M).
            design = project_out(orthonormal_rows(project_out(design, basis)), basis)
            with torch.no_grad():
                lora_a.copy_(design.to(lora_a.dtype))
            lora_a.requires_grad_(False)
            fixed.add(id(lora_a))
        return {k: p for k, p in trainable_parameters(self.model).items() if id(p) not in fixed}

    def finish(self, task: int, name: str) -> None:
        wrappers = lowrank_wrappers(self.model, name, self.name)
        inputs = layer_inputs(self.model, wrappers, self.ctx.train_sets[task], self.ctx.pad_id)
        threshold = float(self.ctx.options.get("inflora_threshold", 0.95))
        for path, wrapper in wrappers.items():
            rank, dim = wrapper.lowrank()[0].shape
            self.bases[path] = extend_basis(self.bases.get(path), inputs[path], threshold,
                                            dim - rank)
        self.report["basis_dims"] = {p: int(b.shape[1]) for p, b in list(self.bases.items())[:2]}

    def routing_state(self) -> dict[str, torch.Tensor]:
        return {f"basis.{path}": b.contiguous() for path, b in self.bases.items()}

    def load_routing(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bases = {k.removeprefix("basis."): v for k, v in tensors.items()
                      if k.startswith("basis.")}
