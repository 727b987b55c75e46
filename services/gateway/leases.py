"""Token leases: a gateway replica takes a few tokens at once from a key's bucket in Redis and
spends them on the key's next calls without a round trip to the cache service, so a busy key
with a rate limit costs one check per lease, not one per call.

A lease holds at most `LEASE_S` of the bucket's refill (rpm / 600 tokens; under 1,200 rpm a
call takes only its own token: every call is checked), one lease per bucket at a time (while
one is being taken, the replica's other calls take their own token only), and ends `LEASE_S`
after its last use; what is left then goes back to the bucket. Every token spent was taken
from the shared bucket first, so the replicas together never admit more than the limit; what
a lease holds is not available to the other replicas meanwhile (at most 100 ms of refill
each). Only a call that claims nothing but tokens is admitted from a lease: a concurrency slot
or quota items need the shared state every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fmserve.v1 import limits_pb2

LEASE_S = 0.1
"""How much of a bucket's refill a lease holds, and how long it lives unspent."""


def lease_size(per_minute: int) -> int:
    """Tokens a call takes from its bucket when the bucket has them: LEASE_S of its refill."""
    return max(1, int(per_minute * LEASE_S / 60))


@dataclass
class _Lease:
    bucket: limits_pb2.Bucket
    tokens: int
    ends: float


class Leases:
    """The tokens this replica holds, per (key id, bucket name)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[tuple[str, str], _Lease] = {}
        self._asking: set[tuple[str, str]] = set()

    def spend(self, key_id: str, buckets: Sequence[str]) -> bool:
        """Admit a call from held leases (a token of each of its buckets, by name), if they
        have them; False: the call goes to the cache service. Only for a call that claims
        nothing but tokens (its caller checks: a slot or quota items need the shared state)."""
        if not buckets:
            return False
        now = self.clock()
        leases = [self._held.get((key_id, name)) for name in buckets]
        if any(lease is None or lease.tokens < 1 or lease.ends <= now for lease in leases):
            return False
        for lease in leases:
            lease.tokens -= 1  # type: ignore[union-attr]
            lease.ends = now + LEASE_S  # type: ignore[union-attr]
        return True

    def ask(self, claim: limits_pb2.Claim) -> list[tuple[str, str]]:
        """Before a claim goes to the cache service: it asks for a lease of each bucket no
        other call is already asking one for (else it takes its own token only). Returns the
        buckets it asks for, for `asked` once its answer is in."""
        asking = []
        for bucket in claim.buckets:
            key = (claim.key_id, bucket.name)
            if bucket.take <= 1:
                continue
            if key in self._asking:
                bucket.take = 1
            else:
                self._asking.add(key)
                asking.append(key)
        return asking

    def asked(self, asking: list[tuple[str, str]]) -> None:
        self._asking.difference_update(asking)

    def keep(self, claim: limits_pb2.Claim, verdict: limits_pb2.Verdict) -> None:
        """Hold what an admitted claim took beyond its one token per bucket (topping up a
        lease its bucket may still have)."""
        ends = self.clock() + LEASE_S
        for bucket, taken in zip(claim.buckets, verdict.taken, strict=False):
            if taken <= 1:
                continue
            lease = self._held.setdefault((claim.key_id, bucket.name), _Lease(bucket, 0, ends))
            lease.tokens += taken - 1
            lease.ends = ends

    def ended(self, everything: bool = False) -> list[limits_pb2.TokenRefund]:
        """Leases whose time is up (or all of them), forgotten: their unspent tokens, to give
        back."""
        now = self.clock()
        over = [key for key, lease in self._held.items() if everything or lease.ends <= now]
        refunds = []
        for key in over:
            lease = self._held.pop(key)
            if lease.tokens > 0:
                refunds.append(
                    limits_pb2.TokenRefund(key_id=key[0], bucket=lease.bucket, tokens=lease.tokens)
                )
        return refunds
