"""The gateway's copy of every traffic policy. Routing reads it from memory (a dict lookup per
request); a task polls the cache service's policy revision every `poll_s` and reads the
policies again when it moved, so a change made on any replica is in force on every replica
within `poll_s` plus one round trip. A replica that writes a policy applies it at once.

While the cache service cannot be reached the last policies read stay in force (a replica
started then routes by the repository's default version until it can read them)."""

from __future__ import annotations

import asyncio
import logging

from fmserve.errors import FmserveError
from fmserve.v1 import policy_pb2
from services.gateway.metrics import TRAFFIC_SHARE
from services.gateway.policy_store import PolicyStore
from services.gateway.traffic import DEFAULT_MIN_REQUESTS, DEFAULT_WINDOW_S, Guard, Split

log = logging.getLogger("fmserve.gateway.policies")


class PolicyBook:
    """Every model's policy, in memory; a resource (`start` begins polling)."""

    def __init__(self, store: PolicyStore, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self.revision = -1
        self._policies: dict[str, policy_pb2.TrafficPolicy] = {}
        self._splits: dict[str, Split] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def split(self, model: str) -> Split | None:
        return self._splits.get(model)

    def splits(self) -> list[Split]:
        return list(self._splits.values())

    def policy(self, model: str) -> policy_pb2.TrafficPolicy | None:
        return self._policies.get(model)

    def apply(self, policy: policy_pb2.TrafficPolicy) -> None:
        """A policy read or just written, unless a newer one is known: a read that began
        before this replica's own write may end after it."""
        known = self._policies.get(policy.model)
        if known is None or known.revision < policy.revision:
            self._set(policy)

    async def refresh(self) -> None:
        """Read every policy now."""
        listing = await self.store.all()
        listed = {p.model for p in listing.policies}
        for model, known in list(self._policies.items()):
            if model not in listed and known.revision <= listing.revision:
                self._forget(model)  # gone from the store (not written after this read)
        for policy in listing.policies:
            self.apply(policy)
        self.revision = listing.revision

    async def _poll(self) -> None:
        unreachable = False
        while True:
            try:
                if await self.store.revision() != self.revision:
                    await self.refresh()
                unreachable = False
            except FmserveError as error:
                if not unreachable:  # once per outage, not every poll
                    log.warning("cannot read traffic policies: %s", error.message)
                unreachable = True
            await asyncio.sleep(self.poll_s)

    def _set(self, policy: policy_pb2.TrafficPolicy) -> None:
        self._forget(policy.model)
        split = split_of(policy)
        self._policies[policy.model], self._splits[policy.model] = policy, split
        for version, percent in split.shares().items():
            TRAFFIC_SHARE.labels(policy.model, version).set(percent)

    def _forget(self, model: str) -> None:
        self._policies.pop(model, None)
        split = self._splits.pop(model, None)
        for version in split.shares() if split else ():
            TRAFFIC_SHARE.remove(model, version)


def split_of(policy: policy_pb2.TrafficPolicy) -> Split:
    """A stored policy as routing reads it."""
    g = policy.guard
    guard = Guard(
        g.max_error_ratio, g.max_p99_ms, g.window_s or DEFAULT_WINDOW_S,
        g.min_requests or DEFAULT_MIN_REQUESTS,
    )  # fmt: skip
    return Split(
        model=policy.model,
        stable=policy.stable_version,
        canary=policy.canary_version,
        canary_percent=policy.canary_percent,
        sticky=policy.sticky,
        shadow=policy.shadow_version,
        guard=guard,
        revision=policy.revision,
    )
