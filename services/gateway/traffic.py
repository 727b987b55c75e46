"""Traffic splits: which version answers a request that names none, from its model's policy.

The choice is pure: a sticky split hashes the model and the request's routing key to a point in
[0, 1), so every replica holding the same policy sends a key to the same version, and a key on
the canary at 10% stays on it at 50% (the canary's range only grows). Other requests draw the
point at random. Versions of a split are checked against the repository when it is set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WINDOW_S = 60
DEFAULT_MIN_REQUESTS = 20


@dataclass(frozen=True)
class Guard:
    """The canary's limits over a window; a limit of 0 is off."""

    max_error_ratio: float = 0.0
    max_p99_ms: float = 0.0
    window_s: float = DEFAULT_WINDOW_S
    min_requests: int = DEFAULT_MIN_REQUESTS

    @property
    def active(self) -> bool:
        return self.max_error_ratio > 0 or self.max_p99_ms > 0


@dataclass(frozen=True)
class Split:
    """A model's policy as routing reads it."""

    model: str
    stable: str
    canary: str = ""
    canary_percent: int = 0
    sticky: bool = False
    shadow: str = ""
    guard: Guard = Guard()
    revision: int = 0

    def choose(self, routing_key: str = "", draw: Callable[[], float] = random.random) -> str:
        """The version for one request."""
        if not self.canary or self.canary_percent <= 0:
            return self.stable
        point = key_point(self.model, routing_key) if self.sticky and routing_key else draw()
        return self.canary if point < self.canary_percent / 100 else self.stable

    def shares(self) -> dict[str, float]:
        """Percent of requests per version (the shadow's copies are not a share)."""
        if not self.canary:
            return {self.stable: 100.0}
        return {self.stable: 100.0 - self.canary_percent, self.canary: float(self.canary_percent)}

    @property
    def guarded_canary(self) -> str:
        """The canary when a guard watches it, else ''."""
        return self.canary if self.canary_percent > 0 and self.guard.active else ""


def key_point(model: str, routing_key: str) -> float:
    """A routing key's fixed point in [0, 1) for a model (blake2b: stable across processes,
    unlike hash())."""
    digest = hashlib.blake2b(f"{model}\0{routing_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
