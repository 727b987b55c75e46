"""What a call claims from its key's limits (services/gateway/limits.py), and that a slot is
given back even when the check itself fails or the caller leaves during it. The limits store is
an in-memory stand-in here; tests/integration/test_key_limits.py runs the real one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fmserve.errors import Unavailable
from fmserve.v1 import limits_pb2
from services.gateway.limits import MAX_MODEL_CHARS, KeyLimits
from services.gateway.principal import Principal

pytestmark = pytest.mark.timeout(10)


class FakeLimits:
    """Answers Admit with `failure` raised, or admitted; records releases."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.released: list[tuple[str, str]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def admit(self, claim: limits_pb2.Claim) -> limits_pb2.Verdict:
        if self.failure is not None:
            raise self.failure
        return limits_pb2.Verdict(admitted=True)

    def release(self, key_id: str, call_id: str) -> None:
        self.released.append((key_id, call_id))

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int) -> None:
        pass


def limits(fake: FakeLimits | None = None, model_rpm: int = 0) -> KeyLimits:
    return KeyLimits(fake or FakeLimits(), 30.0, model_rpm)  # type: ignore[arg-type]


def key(**limits: int) -> Principal:
    return Principal("0123456789abcdef", "ci", ("infer:*",), False, **limits)


def test_a_key_without_limits_claims_nothing() -> None:
    assert limits().claim(key(), "m", 5) is None


def test_the_key_bucket_holds_a_minute_of_requests() -> None:
    claim = limits().claim(key(rpm=600), "m", 5)
    assert claim is not None
    assert [(b.name, b.per_minute, b.burst) for b in claim.buckets] == [("key", 600, 600)]
    assert (claim.max_concurrency, claim.call_id, claim.daily_items, claim.items) == (0, "", 0, 0)


def test_a_per_model_bucket_applies_to_calls_that_name_a_model() -> None:
    claim = limits(model_rpm=30).claim(key(), "m" * 500, 1)
    assert claim is not None
    [bucket] = claim.buckets
    assert bucket.name == "model:" + "m" * MAX_MODEL_CHARS and bucket.burst == 30
    assert limits(model_rpm=30).claim(key(), "", 1) is None  # GetJob, ListJobs ...


def test_a_slot_and_items_are_claimed_only_under_those_limits() -> None:
    claim = limits().claim(key(max_concurrency=2, daily_items=100), "m", 7)
    assert claim is not None and not claim.buckets
    assert claim.max_concurrency == 2 and len(claim.call_id) == 32
    assert (claim.daily_items, claim.items) == (100, 7)


@pytest.mark.parametrize(
    "failure", [Unavailable("down"), asyncio.CancelledError()], ids=["down", "cancelled"]
)
async def test_a_slot_is_given_back_when_the_check_fails_or_the_caller_leaves(
    failure: BaseException,
) -> None:
    fake = FakeLimits(failure)
    gate = limits(fake)
    with pytest.raises(type(failure)):
        async with gate.admit(key(max_concurrency=1), "m", 1):
            pytest.fail("admitted without an answer")
    assert [k for k, _ in fake.released] == ["0123456789abcdef"]
