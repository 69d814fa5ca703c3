"""Small CPU probes of the compressed-bases benchmark (benchmarks/compressed.py): the process's
peak resident memory, the quantised backends' layer speed, and the error of merging a LoRA into a
quantised base."""
from __future__ import annotations

import os
import threading
import time
from typing import Any


class RssPeak:
    """Peak resident memory of this process while the block runs (sampled from /proc)."""

    def __enter__(self) -> "RssPeak":
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.02)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def backend_speed(repeats: int = 10) -> list[dict[str, Any]]:
    """CPU ms of forward+backward (to the input) of one smollm2 MLP-sized layer, 576 -> 1536, 1024 tokens."""
    import torch

    torch.set_num_threads(1)
    from petkit.models.quantize import QuantSpec, quantize_linear

    torch.manual_seed(0)
    weight, x = torch.randn(1536, 576) * 0.02, torch.randn(1024, 576, requires_grad=True)
    layers = {("dense", "fp32"): torch.nn.Linear(576, 1536, bias=False).requires_grad_(False)}
    for backend, mode in (("bitsandbytes", "nf4"), ("bitsandbytes", "int8"), ("torchao", "nf4"), ("torchao", "int8")):
        layers[(backend, mode)] = quantize_linear(weight, None, QuantSpec(mode, backend))
    rows = []
    for (backend, mode), layer in layers.items():
        times = []
        for _ in range(repeats + 1):  # CPU time: the machine is shared, wall time is noise
            t = time.process_time()
            layer(x).sum().backward()
            times.append(time.process_time() - t)
        rows.append({"backend": backend, "mode": mode, "ms": round(1000 * sorted(times[1:])[repeats // 2], 2)})
    return rows


def merge_error() -> list[dict[str, Any]]:
    """Relative logits error of quantising a tiny random Llama, and of merging a LoRA into it."""
    import copy

    import torch

    import petkit as pk
    from petkit.models import tiny_model
    from petkit.models.quant_merge import relative_error

    rows = []
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = lambda m: m(input_ids=ids).logits.detach()  # noqa: E731
    for mode in ("nf4", "fp4", "int8"):
        for scale in (0.01, 0.05):
            base = tiny_model("llama")[0]
            model = pk.quantize(copy.deepcopy(base), mode)
            quant = relative_error(logits(model), logits(base))
            pk.attach(model, pk.LoraConfig(targets="all-linear"))
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for p in pk.trainable_parameters(model).values():
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
            report = pk.merge_quantized(model, {"input_ids": ids})
            rows.append({"mode": mode, "lora_init_scale": scale, "quant_error": round(quant, 4),
                         "merge_error": round(report.relative_error, 4),
                         "ratio": round(report.relative_error / quant, 2)})
    return rows
