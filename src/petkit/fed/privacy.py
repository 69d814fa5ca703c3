"""The privacy budget of DP-FedAvg, from Google's `dp-accounting` RDP accountant.

Each round samples m of N clients uniformly *without replacement* (fixed size, as Flower's
strategies sample) and releases the sum of clipped updates plus N(0, (z C)^2). Under the
replace-one neighbouring relation (one client's data swapped for another's) that sum has L2
sensitivity 2C, so each round is a `SampledWithoutReplacementDpEvent(N, m, Gaussian(z / 2))`
(Wang, Balle & Kasiviswanathan, 2019); rounds compose. Epsilon is user-level: it covers
everything a client sends in all rounds.
"""

from __future__ import annotations

import math

from petkit.core.errors import MissingPackageError
from petkit.models.packages import extra_install


class PrivacyAccountant:
    """Composes one subsampled Gaussian event per round; `epsilon()` at the configured delta."""

    def __init__(self, clients: int, sampled: int, noise: float, delta: float) -> None:
        """N = `clients`, m = `sampled`, z = `noise` (std z*C on the clipped sum)."""
        try:
            import dp_accounting
            from dp_accounting.rdp import RdpAccountant
        except ImportError as err:  # pragma: no cover - dp-accounting is in the fed extra
            raise MissingPackageError(f"DP accounting needs dp-accounting: {extra_install('fed')}") from err
        self._dpa = dp_accounting
        self.clients, self.sampled, self.noise, self.delta = clients, sampled, noise, delta
        self.accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        self.rounds = 0

    def step(self) -> float:
        """Account one more round; return epsilon after it."""
        self.rounds += 1
        if self.noise > 0:
            gaussian = self._dpa.GaussianDpEvent(self.noise / 2.0)
            event = self._dpa.SampledWithoutReplacementDpEvent(self.clients, self.sampled, gaussian) \
                if self.sampled < self.clients else gaussian
            self.accountant.compose(event)
        return self.epsilon()

    def epsilon(self) -> float:
        """Epsilon at `delta` so far (inf without noise)."""
        if self.noise <= 0:
            return math.inf
        if self.rounds == 0:
            return 0.0
        return float(self.accountant.get_epsilon(self.delta))
