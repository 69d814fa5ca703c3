"""Split a task's training examples over N clients: IID or Dirichlet non-IID over labels.

Dirichlet (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution"): for each
class c, client shares p_c ~ Dir(alpha * 1_N); the class's shuffled examples are cut at the
cumulative shares. Small alpha gives each client few classes; large alpha approaches IID. Every
client must end up with at least `min_size` examples; draws are repeated (seeded) until they do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from petkit.core.errors import ConfigError

MAX_DRAWS = 200


@dataclass(frozen=True)
class ClientShare:
    """One client's part of the data: indices into the training list and its label histogram."""

    client: int
    indices: tuple[int, ...]
    histogram: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of examples."""
        return len(self.indices)


def iid(n_examples: int, n_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into `n_clients` parts whose sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(n_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]


def dirichlet(labels: Sequence[int], n_clients: int, alpha: float, seed: int,
              min_size: int = 2) -> list[list[int]]:
    """Per-class Dirichlet(alpha) shares; redrawn until every client has >= `min_size` examples."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    classes = np.unique(labels_arr)
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(f"fed.alpha={alpha} leaves some of {n_clients} clients with fewer than "
                      f"{min_size} of {len(labels_arr)} examples in {MAX_DRAWS} draws; "
                      "raise fed.alpha, lower fed.clients or use more data")


def partition(labels: Sequence[int] | None, n_examples: int, n_clients: int, scheme: str,
              alpha: float, seed: int, min_size: int = 2) -> list[ClientShare]:
    """Client shares of `n_examples` examples (`labels` None for tasks without labels)."""
    if n_examples < n_clients * min_size:
        raise ConfigError(f"{n_examples} training examples cannot give {n_clients} clients "
                          f"{min_size} each; lower fed.clients or raise data.train_size")
    if scheme == "dirichlet":
        if labels is None:
            raise ConfigError("fed.partition=dirichlet needs a labelled (classification) task; "
                              "use fed.partition=iid")
        parts = dirichlet(labels, n_clients, alpha, seed, min_size)
    elif scheme == "iid":
        parts = iid(n_examples, n_clients, seed)
    else:
        raise ConfigError(f"fed.partition must be 'iid' or 'dirichlet', got {scheme!r}")
    n_classes = (max(labels) + 1) if labels is not None and len(labels) else 0
    shares = []
    for client, idx in enumerate(parts):
        counts = Counter(labels[i] for i in idx) if labels is not None else Counter()
        shares.append(ClientShare(client, tuple(idx), tuple(counts[c] for c in range(n_classes))))
    return shares


def report(shares: Sequence[ClientShare], label_names: Sequence[str] = ()) -> str:
    """A table: client, examples, label histogram."""
    names = list(label_names) or [str(i) for i in range(len(shares[0].histogram))]
    width = max([8, *(len(n) for n in names)])
    lines = [f"{'client':>6} {'examples':>8}  " + " ".join(f"{n[:width]:>{width}}" for n in names)]
    for s in shares:
        lines.append(f"{s.client:>6} {s.size:>8}  " + " ".join(f"{c:>{width}}" for c in s.histogram))
    return "\n".join(lines)


def labels_of(examples: Sequence[dict]) -> list[int] | None:
    """Integer labels of classification examples, None for instruction examples."""
    if not examples or "label" not in examples[0]:
        return None
    return [int(e["label"]) for e in examples]
