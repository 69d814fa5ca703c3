"""LoRA initialisations (`--method.init`): where the factors A (r, in), B (out, r) start.

    default    A Kaiming-uniform, B = 0                        (Hu et al., 2021)
    gaussian   A ~ N(0, 1/r), B = 0                            (PEFT's "gaussian")
    pissa      W = U S V^T: B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_r^T; the base keeps W - s B A
               (Meng et al., 2024, PiSSA, arXiv:2404.02948); `pissa_niter_K`: the top-r SVD by
               K subspace iterations of torch.svd_lowrank (Halko et al.) instead of a full SVD
    olora      W = Q R: B = Q[:, :r], A = R[:r]; the base keeps W - s B A
               (Büyükakyüz, 2024, OLoRA, arXiv:2406.01775)
    eva        A = top-r principal directions of the layer's inputs on a few batches, B = 0
               (Paischer et al., 2024, "One Initialization to Rule Them All", arXiv:2410.07170)
    corda      C = X^T X (+ damping): W C = U S V^T, B = U_r sqrt(S_r/s), A = sqrt(S_r/s) (V^T C^-1)_r;
               the base keeps W - s B A (Yang et al., 2024, CorDA, arXiv:2406.05223; "ipm" mode)
    lora-ga    G = dL/dW averaged over a few batches = U S V^T: A = V_{1..r}^T, B = U_{r+1..2r} S
               times out^(1/4) / sqrt(gamma) (gamma = 16); the base keeps W - s B A
               (Wang et al., 2024, LoRA-GA, arXiv:2407.05000; PEFT's defaults ArB2r / stable)
    loftq      A, B = the top-r SVD of W - Q(W), with Q the quantised base (`pk.loftq`, models/)
               (Li et al., 2023, LoftQ, arXiv:2310.08659)

petkit never edits the base weight: an init that moves part of W into the factors keeps its
starting product as a frozen offset (`init_A`, `init_B`, saved with the adapter, never trained),
and the delta is `s (B A - B0 A0)` — the base seen through the adapter is exactly PiSSA's residual
`W - s B0 A0`, `pk.disabled` gives W, and the gradients are PiSSA's. PEFT's own conversion for
export (`path_initial_model_for_weight_conversion`) is the same sum as one rank-2r LoRA.
"""
from __future__ import annotations

import re

import torch

from petkit.core.capabilities import InitStats
from petkit.core.errors import ConfigError

NAMES = ("default", "gaussian", "pissa", "pissa_niter_K", "olora", "eva", "corda", "lora-ga", "loftq")
OFFSET = ("pissa", "olora", "corda", "lora-ga")  # inits whose factors start non-zero (base keeps W - s B0 A0)
# what a fresh adapter waits for: pk.initialize collects inputs / weight_grad; loftq waits for pk.loftq
DATA = {"eva": "inputs", "corda": "inputs", "lora-ga": "weight_grad", "loftq": "loftq"}
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
GA_GAMMA = 16.0


def check_init(init: str) -> None:
    if not isinstance(init, str) or (init not in NAMES[:3] + NAMES[4:] and not _NITER.fullmatch(init)):
        raise ConfigError(f"--method.init must be one of {', '.join(NAMES)} (K >= 1 SVD iterations), got {init!r}")


def family(init: str) -> str:
    """`pissa_niter_K` -> "pissa"; others as they are."""
    return "pissa" if _NITER.fullmatch(init) else init


def has_offset(init: str) -> bool:
    return family(init) in OFFSET


def weight_factors(init: str, w: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) from the dense (out, in) base weight alone, in float32; None for inits that start
    from LoRA's default or need data."""
    w = w.float()
    if init == "gaussian":
        return torch.randn(r, w.shape[1]) / r, torch.zeros(w.shape[0], r)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return _split(u[:, :r], s[:r] / scale, vh[:r])
    niter = _NITER.fullmatch(init)
    if niter:
        u, s, v = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        return _split(u, s / scale, v.T)
    return None


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S) V^T, B = U sqrt(S): B A = U S V^T with the singular values shared evenly."""
    root = s.sqrt()
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


def data_factors(init: str, w: torch.Tensor, stats: InitStats, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from what `pk.initialize` collected on a few batches (see DATA), in float32."""
    w = w.float()
    if init == "eva":
        mean = stats.xsum / stats.count
        cov = stats.xtx - stats.count * torch.outer(mean, mean)
        _, vecs = torch.linalg.eigh(cov.double())
        return vecs.flip(-1)[:, :r].T.float().contiguous(), torch.zeros(w.shape[0], r)
    if init == "corda":
        cov = stats.xtx.double()
        damp = 0.01 * cov.diagonal().mean()
        fixed = cov + damp * torch.eye(cov.shape[0], dtype=cov.dtype)
        u, s, vh = torch.linalg.svd(w.double() @ fixed, full_matrices=False)
        c = vh[:r] @ torch.linalg.inv(fixed)  # W's top-r part is U S c, c's rows not unit
        n = c.norm(dim=1)
        # Each rank's norm split evenly between B and A (as PiSSA's, which this is at C = I):
        # sqrt(S) on both sides would leave B larger with the covariance's scale (the tokens
        # summed), and Adam's steps on A would then move B A that much further.
        a, b = _split(u[:, :r], s[:r] * n / scale, c / n[:, None])
        return a.float(), b.float()
    if init == "lora-ga":
        u, s, v = torch.svd_lowrank(stats.grad.float(), q=min(4 * r, *stats.grad.shape), niter=4)
        a, b = v[:, :r].T, u[:, r:2 * r] * s[r:2 * r]
        return a.contiguous(), (b * (w.shape[0] ** 0.25 / GA_GAMMA ** 0.5)).contiguous()
    raise ConfigError(f"--method.init {init} is not data-driven")
