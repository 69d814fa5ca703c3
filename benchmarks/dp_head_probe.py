"""Probe of DP-SGD on MiniLM-L6's new rotten-tomatoes head alone (docs/privacy.md).

    python benchmarks/dp_head_probe.py adam:1e-1:512:24:8 adam:1e-1:512:24:none sgd:10:512:24:8

MiniLM-L6's pooled outputs (eval mode, no dropout) of 4,000 training examples and of the 300
validation examples held out of the training split (`data.validation_size`; the test split is never
read) are computed once (cached in runs/dp_probe_features.pt); then each argument
OPTIMISER:LR:BATCH:STEPS:EPSILON trains the classifier alone with DP-SGD on those features (the
same clip-sum-noise-divide as training/dp.py, C = 1, delta 1e-5, sigma from Opacus' RDP
accountant; `none`: no clip, no noise), 3 noise seeds each, and prints validation accuracy.
Without a backbone in the loop each cell takes seconds: a probe of the head's optimisation
under DP noise, not a DP LoRA result.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

CACHE = Path("runs/dp_probe_features.pt")


def features() -> tuple[torch.Tensor, ...]:
    """(train features, labels, validation features, labels, head weight, head bias)."""
    if CACHE.exists():
        return torch.load(CACHE)
    from petkit.app.pipeline import prepare
    from petkit.app.recipe import DataSpec, ModelSpec, Recipe
    from petkit.data.encode import collate

    torch.manual_seed(0)
    data = DataSpec(name="rotten-tomatoes", task_type="auto", train_size=4300, validation_size=300,
                    test_size=8, max_length=64)
    prep, _ = prepare(Recipe(method={"name": "lora"}, model=ModelSpec("minilm-l6"), data=data))
    model = prep.model.eval()

    def pooled(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), 64):
                batch = collate(rows[start:start + 64], prep.pad_id)
                batch.pop("labels")
                out.append(model.bert(**batch).pooler_output)
        return torch.cat(out), torch.stack([torch.as_tensor(r["labels"]) for r in rows])

    cached = (*pooled(prep.train), *pooled(prep.validation),
              model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone())
    CACHE.parent.mkdir(exist_ok=True)
    torch.save(cached, CACHE)
    return cached


def probe(spec: str, seed: int, data: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Validation accuracy and sigma of one DP-SGD (or plain) run of the head."""
    from opacus.accountants.utils import get_noise_multiplier

    x_train, y_train, x_val, y_val, w0, b0 = data
    name, lr, batch, steps, eps = spec.split(":")
    batch, steps, n = int(batch), int(steps), len(x_train)
    sigma = 0.0 if eps == "none" else get_noise_multiplier(
        target_epsilon=float(eps), target_delta=1e-5, sample_rate=batch / n, steps=steps, accountant="rdp")
    clip = float("inf") if eps == "none" else 1.0
    weight, bias = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    optimiser = (torch.optim.AdamW([weight, bias], lr=float(lr)) if name == "adam"
                 else torch.optim.SGD([weight, bias], lr=float(lr), momentum=0.9))
    warm = max(1, int(0.1 * steps))  # linear schedule, 10% warm-up, as the benchmark's runs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(n, generator=gen)[:batch]
        x, y = x_train[index], y_train[index]
        error = (x @ weight.T + bias).softmax(-1) - torch.nn.functional.one_hot(y, 2).float()
        g_weight, g_bias = error[:, :, None] * x[:, None, :], error
        norms = torch.sqrt(g_weight.flatten(1).pow(2).sum(1) + g_bias.pow(2).sum(1))
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        for param, g in ((weight, g_weight), (bias, g_bias)):
            noise = torch.normal(0.0, sigma * clip if sigma else 0.0, param.shape, generator=gen)
            param.grad = (torch.einsum("i,i...->...", factor, g) + noise) / batch
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        return float(((x_val @ weight.T + bias).argmax(-1) == y_val).float().mean()), sigma


def main() -> None:
    torch.set_num_threads(1)
    data = features()
    x_train = data[0]
    print(f"pooled features: mean norm {x_train.norm(dim=1).mean():.3f}, norm of their mean "
          f"{x_train.mean(0).norm():.3f}")
    for spec in sys.argv[1:]:
        runs = [probe(spec, seed, data) for seed in range(3)]
        print(spec, "validation accuracy per seed", [round(a, 3) for a, _ in runs],
              "sigma", round(runs[0][1], 3), flush=True)


if __name__ == "__main__":
    main()
