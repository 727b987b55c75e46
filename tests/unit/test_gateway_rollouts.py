"""Rollouts (services/gateway/rollouts.py) over in-memory seams: a policy store with the cache
service's compare-and-set, and an inference service whose versions load or fail as told."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from fmserve.core.repository import ModelRepository
from fmserve.errors import Conflict, InvalidInput, NotFound
from fmserve.v1 import policy_pb2
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from services.gateway.rollouts import Rollouts
from services.gateway.routes import Router

pytestmark = pytest.mark.timeout(10)

MODEL = "tiny"


class MemoryStore(PolicyStore):
    """The cache service's TrafficPolicies, in memory: the same compare-and-set."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1")
        self.policies: dict[str, policy_pb2.TrafficPolicy] = {}
        self.counter = 0

    async def revision(self) -> int:
        return self.counter

    async def all(self) -> policy_pb2.ListPoliciesResponse:
        return policy_pb2.ListPoliciesResponse(
            policies=list(self.policies.values()), revision=self.counter
        )

    async def put(
        self, policy: policy_pb2.TrafficPolicy, expected_revision: int
    ) -> policy_pb2.TrafficPolicy:
        known = self.policies.get(policy.model)
        if (known.revision if known else 0) != expected_revision:
            raise Conflict("changed meanwhile")
        self.counter += 1
        stored = policy_pb2.TrafficPolicy()
        stored.CopyFrom(policy)
        stored.revision = self.counter
        self.policies[policy.model] = stored
        return stored


class Inference:
    """Versions load at once, or fail with the reason given; unloads are noted."""

    def __init__(self, failing: dict[str, str]) -> None:
        self.failing = failing
        self.unloaded: list[str] = []

    async def load_ready(self, model: str, version: str, timeout_s: float) -> str:
        return self.failing.get(version, "")

    async def unload(self, model: str, version: str) -> None:
        self.unloaded.append(version)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    for version in ("1", "2", "3"):
        (tmp_path / MODEL / version).mkdir(parents=True)
        (tmp_path / MODEL / version / "config.json").write_text('{"id2label": {"0": "a"}}')
    (tmp_path / MODEL / "model.toml").write_text('task = "text-classification"\n')
    return Router(ModelRepository(tmp_path), 8, 100)


def rollouts(router: Router, store: MemoryStore, inference: Inference) -> Rollouts:
    book = PolicyBook(store, poll_s=1.0)
    return Rollouts(book, store, inference, router, ready_timeout_s=1.0)  # type: ignore[arg-type]


def rollbacks() -> float:
    labels = {"model": MODEL, "reason": "error_ratio"}
    return REGISTRY.get_sample_value("fmserve_gateway_rollbacks_total", labels) or 0.0


def canary(version: str, percent: int = 10) -> policy_pb2.TrafficPolicy:
    return policy_pb2.TrafficPolicy(
        model=MODEL, stable_version="1", canary_version=version, canary_percent=percent
    )


async def test_a_canary_serves_then_promotes_then_rolls_back_to_the_previous(
    router: Router,
) -> None:
    store, inference = MemoryStore(), Inference({})
    admin = rollouts(router, store, inference)
    serving = await admin.set(canary("2"))
    assert serving.status.state == policy_pb2.ROLLOUT_STATE_SERVING
    promoted = await admin.promote(MODEL)
    assert (promoted.stable_version, promoted.previous_version) == ("2", "1")
    assert not promoted.canary_version
    rolled = await admin.rollback(MODEL)
    assert (rolled.stable_version, rolled.previous_version) == ("1", "")
    with pytest.raises(Conflict, match="nothing to roll back"):
        await admin.rollback(MODEL)
    await asyncio.sleep(0)  # the unload runs in the background
    assert inference.unloaded == ["2"]


async def test_a_version_that_fails_to_load_gets_no_traffic(router: Router) -> None:
    store = MemoryStore()
    admin = rollouts(router, store, Inference({"3": "corrupt weights"}))
    await admin.set(canary("2"))
    with pytest.raises(Conflict, match=r"version 3 of 'tiny' FAILED .*corrupt weights"):
        await admin.set(canary("3", 50))
    kept = await admin.get(MODEL)
    assert (kept.canary_version, kept.canary_percent) == ("2", 10)
    assert kept.status.state == policy_pb2.ROLLOUT_STATE_FAILED
    assert (kept.status.version, kept.status.reason) == ("3", "corrupt weights")


async def test_bad_policies_are_refused_with_the_reason(router: Router) -> None:
    admin = rollouts(router, MemoryStore(), Inference({}))
    with pytest.raises(InvalidInput, match="0-100"):
        await admin.set(canary("2", 150))
    with pytest.raises(InvalidInput, match="differ"):
        await admin.set(canary("1"))
    with pytest.raises(NotFound, match="no version '9'"):
        await admin.set(canary("9"))
    with pytest.raises(NotFound, match="no traffic policy"):
        await admin.get(MODEL)


async def test_of_two_replicas_rolling_back_one_revision_one_wins(router: Router) -> None:
    store = MemoryStore()
    first, second = (rollouts(router, store, Inference({})) for _ in range(2))
    revision = (await first.set(canary("2"))).revision
    await second.book.refresh()
    before = rollbacks()
    outcomes = await asyncio.gather(
        first.rollback(MODEL, "broken", "error_ratio", revision),
        second.rollback(MODEL, "broken", "error_ratio", revision),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "TrafficPolicy"]
    assert rollbacks() == before + 1
