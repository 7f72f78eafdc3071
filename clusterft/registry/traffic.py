"""A model's traffic split between its production and canary versions, and the sticky choice of one
for a request.

The canary alias carries a weight, 0-100: the share of requests its version serves; production serves
the rest, so a split always sums to 100. A request with a session id goes where a stable hash of
(model, session id) falls: bucket = sha256 % 100, canary when bucket < weight. The same session stays
on the same version while the split is unchanged, and raising the weight only moves production
sessions over (a canary session's bucket stays below the larger weight). Requests without a session id
are split by a random key per request, hence by weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from clusterft.errors import UserError

Route = Literal["production", "canary"]


def check_weight(weight: object) -> int:
    """The canary weight as an int in [0, 100], or a UserError naming the fix."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise UserError(
            f"canary weight must be a whole percentage from 0 to 100, got {weight!r}; production "
            "serves the rest (e.g. --weight 10 sends 10% of sessions to the canary, 90% to production)"
        )
    return weight


def bucket(model_name: str, key: str) -> int:
    """The session's bucket in [0, 100): the same for the same (model, key) in every process."""
    digest = hashlib.sha256(f"{model_name}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


@dataclass(frozen=True)
class TrafficSplit:
    """Where a model's requests go: `production` serves 100 - `canary_weight` percent of them."""

    model_name: str
    production: str | None
    canary: str | None
    canary_weight: int

    @property
    def active(self) -> bool:
        """Whether any request goes to the canary."""
        return self.canary is not None and self.canary_weight > 0

    @property
    def weights(self) -> dict[str, int]:
        """Version -> percent of requests (one entry when both aliases name the same version)."""
        if not self.active:
            return {self.production: 100} if self.production else {}
        assert self.canary is not None and self.production is not None
        split = {self.production: 100 - self.canary_weight}
        split[self.canary] = split.get(self.canary, 0) + self.canary_weight
        return split

    def route(self, key: str) -> Route:
        """The alias whose version serves the request with routing key `key` (a session id)."""
        if self.active and bucket(self.model_name, key) < self.canary_weight:
            return "canary"
        return "production"
