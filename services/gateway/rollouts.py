"""Rollouts behind the gateway's admin RPCs: set a model's traffic policy (its canary and
shadow versions loaded, pinned and READY first), promote the canary, roll back (on request, or
when the canary breaks its guard).

Every write is a compare-and-set on the policy's revision, so when several replicas see the
same canary break its guard, one rolls it back and the others find the policy changed and let
it be. A version that fails to load never gets traffic: the policy keeps its old split and its
status says FAILED, with the reason."""

from __future__ import annotations

import asyncio
import logging
import time

from fmserve.errors import Conflict, FmserveError, InvalidInput, NotFound
from fmserve.v1 import policy_pb2
from services.gateway.inference_admin import InferenceAdmin
from services.gateway.metrics import ROLLBACKS
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from services.gateway.routes import Router

log = logging.getLogger("fmserve.gateway.rollouts")

REQUESTED = "requested"
State = policy_pb2.RolloutState


class Rollouts:
    def __init__(
        self,
        book: PolicyBook,
        store: PolicyStore,
        inference: InferenceAdmin,
        router: Router,
        ready_timeout_s: float,
    ) -> None:
        self.book = book
        self.store = store
        self.inference = inference
        self.router = router
        self.ready_timeout_s = ready_timeout_s
        self._unloads: set[asyncio.Task[None]] = set()

    async def set(self, asked: policy_pb2.TrafficPolicy) -> policy_pb2.TrafficPolicy:
        policy = self._checked(asked)
        await self.book.refresh()  # another replica may have written within the last poll
        current = self.book.policy(policy.model)
        trial = policy.canary_version or policy.shadow_version
        for version in dict.fromkeys(
            v for v in (policy.stable_version, policy.canary_version, policy.shadow_version) if v
        ):
            if reason := await self.inference.load_ready(
                policy.model, version, self.ready_timeout_s
            ):
                await self._failed(policy, current, version, reason)
        policy.previous_version = _previous(current, policy.stable_version)
        policy.status.CopyFrom(_status(trial or policy.stable_version, State.ROLLOUT_STATE_SERVING))
        return await self._put(policy, current)

    async def get(self, model: str) -> policy_pb2.TrafficPolicy:
        """The model's policy as the store holds it now (not as of the last poll)."""
        await self.book.refresh()
        policy = self.book.policy(model)
        if policy is None:
            self.router.repository.get(model)  # NOT_FOUND for an unknown model
            raise NotFound(f"model {model!r} has no traffic policy: it serves its default version")
        return policy

    async def promote(self, model: str) -> policy_pb2.TrafficPolicy:
        current = await self.get(model)
        if not current.canary_version:
            raise Conflict(f"model {model!r} has no canary to promote")
        policy = _copy(current)
        policy.previous_version, policy.stable_version = (
            current.stable_version,
            policy.canary_version,
        )
        policy.canary_version, policy.canary_percent = "", 0
        policy.status.CopyFrom(_status(policy.stable_version, State.ROLLOUT_STATE_PROMOTED))
        promoted = await self._put(policy, current)
        log.info("promoted", extra={"model": model, "version": policy.stable_version})
        return promoted

    async def rollback(
        self, model: str, reason: str = REQUESTED, label: str = REQUESTED, revision: int = 0
    ) -> policy_pb2.TrafficPolicy:
        """Every request back to the stable version (or the previous one, with no canary).
        `revision`: roll back only that revision of the policy (Conflict if it moved)."""
        current = await self.get(model)
        if revision and current.revision != revision:
            raise Conflict(f"the traffic policy of {model!r} changed meanwhile")
        policy, leaving = _rolled_back(current, reason)
        rolled = await self._put(policy, current)
        ROLLBACKS.labels(model, label).inc()
        log.warning(
            "rolled back",
            extra={"model": model, "versions_left": leaving, "reason": reason, "cause": label},
        )
        for version in leaving:
            self._unload_later(model, version)
        return rolled

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        """Cancel the unloads still under way (the inference service finishes them anyway)."""
        for task in self._unloads:
            task.cancel()
        await asyncio.gather(*self._unloads, return_exceptions=True)

    def _checked(self, asked: policy_pb2.TrafficPolicy) -> policy_pb2.TrafficPolicy:
        """The policy to write, or InvalidInput saying what is wrong."""
        policy = _copy(asked)
        policy.ClearField("status")
        config = self.router.repository.get(policy.model)
        if not policy.stable_version:
            raise InvalidInput("stable_version is required: the version that serves by default")
        for field in ("stable_version", "canary_version", "shadow_version"):
            if version := getattr(policy, field):
                config.resolve_version(version)  # NOT_FOUND naming the versions there are
        if not 0 <= policy.canary_percent <= 100:
            raise InvalidInput(f"canary_percent must be 0-100, got {policy.canary_percent}")
        if policy.canary_version == policy.stable_version:
            raise InvalidInput("the canary must differ from the stable version")
        _check_guard(policy.guard)
        return policy

    async def _failed(
        self,
        policy: policy_pb2.TrafficPolicy,
        current: policy_pb2.TrafficPolicy | None,
        version: str,
        reason: str,
    ) -> None:
        """Record that the version FAILED (the split stays as it was), then refuse the call."""
        kept = _copy(current) if current else _plain(policy.model, policy.stable_version)
        kept.status.CopyFrom(_status(version, State.ROLLOUT_STATE_FAILED, reason))
        if current is not None or version != policy.stable_version:
            await self._put(kept, current)
        raise Conflict(
            f"version {version} of {policy.model!r} FAILED to load, so it gets no traffic: {reason}"
        )

    async def _put(
        self, policy: policy_pb2.TrafficPolicy, current: policy_pb2.TrafficPolicy | None
    ) -> policy_pb2.TrafficPolicy:
        policy.updated_unix_ms = int(time.time() * 1000)
        stored = await self.store.put(policy, current.revision if current else 0)
        self.book.apply(stored)
        return stored

    def _unload_later(self, model: str, version: str) -> None:
        """Unpin and unload a version that left the policy, without holding up the reply."""
        task = asyncio.create_task(self._unload(model, version))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, model: str, version: str) -> None:
        try:
            await self.inference.unload(model, version)
        except FmserveError as error:
            log.warning(
                "could not unload a rolled-back version: %s",
                error.message,
                extra={"model": model, "version": version},
            )


def _rolled_back(
    current: policy_pb2.TrafficPolicy, reason: str
) -> tuple[policy_pb2.TrafficPolicy, list[str]]:
    """The policy after a rollback, and the versions that left it."""
    policy = _copy(current)
    if current.canary_version or current.shadow_version:
        leaving = [v for v in (current.canary_version, current.shadow_version) if v]
        policy.canary_version, policy.canary_percent, policy.shadow_version = "", 0, ""
    elif current.previous_version:
        leaving = [current.stable_version]
        policy.stable_version, policy.previous_version = current.previous_version, ""
    else:
        raise Conflict(
            f"nothing to roll back: {current.model!r} has no canary, no shadow and no version "
            "before its last promote"
        )
    policy.status.CopyFrom(_status(leaving[0], State.ROLLOUT_STATE_ROLLED_BACK, reason))
    return policy, leaving


def _check_guard(guard: policy_pb2.Guard) -> None:
    if not 0 <= guard.max_error_ratio <= 1:
        raise InvalidInput(f"guard.max_error_ratio must be 0-1, got {guard.max_error_ratio}")
    if min(guard.max_p99_ms, guard.window_s, guard.min_requests) < 0:
        raise InvalidInput("guard.max_p99_ms, window_s and min_requests must be >= 0")


def _previous(current: policy_pb2.TrafficPolicy | None, stable: str) -> str:
    """Where a later rollback without a canary goes: the stable version this one replaces."""
    if current is None:
        return ""
    return current.stable_version if current.stable_version != stable else current.previous_version


def _status(version: str, state: int, reason: str = "") -> policy_pb2.RolloutStatus:
    return policy_pb2.RolloutStatus(version=version, state=state, reason=reason)  # type: ignore[arg-type]


def _plain(model: str, stable: str) -> policy_pb2.TrafficPolicy:
    return policy_pb2.TrafficPolicy(model=model, stable_version=stable)


def _copy(policy: policy_pb2.TrafficPolicy) -> policy_pb2.TrafficPolicy:
    copied = policy_pb2.TrafficPolicy()
    copied.CopyFrom(policy)
    return copied
