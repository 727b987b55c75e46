"""Traffic splits (services/gateway/traffic.py), guard windows (guard.py), the policy book's
in-memory copy (policies.py) and routing by policy (routes.py): pure, no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fmserve.core.repository import ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.v1 import policy_pb2
from services.gateway.cache_keys import cache_key
from services.gateway.guard import ERROR_RATIO, P99_LATENCY, Window, breach
from services.gateway.outcomes import Outcomes
from services.gateway.policies import PolicyBook, split_of
from services.gateway.policy_store import PolicyStore
from services.gateway.routes import Router
from services.gateway.traffic import Guard, Split, key_point

pytestmark = pytest.mark.timeout(10)

CANARY_10 = Split("m", stable="1", canary="2", canary_percent=10)


def test_a_weighted_split_sends_its_share_to_the_canary() -> None:
    draws = random.Random(7)
    chosen = [CANARY_10.choose(draw=draws.random) for _ in range(20_000)]
    assert abs(chosen.count("2") / len(chosen) - 0.10) < 0.01
    assert set(chosen) == {"1", "2"}


def test_no_canary_or_no_share_is_all_stable() -> None:
    assert {Split("m", "1").choose() for _ in range(100)} == {"1"}
    assert {Split("m", "1", "2", 0).choose() for _ in range(100)} == {"1"}
    assert {Split("m", "1", "2", 100).choose() for _ in range(100)} == {"2"}


def test_a_sticky_key_always_reaches_the_same_version() -> None:
    split = Split("m", "1", "2", 30, sticky=True)
    for key in (f"user-{i}" for i in range(200)):
        first = split.choose(key)
        assert all(split.choose(key) == first for _ in range(5))


def test_sticky_points_are_deterministic_spread_and_per_model() -> None:
    assert key_point("m", "user-1") == key_point("m", "user-1")  # no per-process salt
    assert key_point("m", "user-1") != key_point("other", "user-1")
    points = [key_point("m", f"user-{i}") for i in range(10_000)]
    assert abs(sum(p < 0.1 for p in points) / len(points) - 0.10) < 0.015


def test_a_key_on_the_canary_stays_there_as_its_share_grows() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    at_10 = {k for k in keys if Split("m", "1", "2", 10, sticky=True).choose(k) == "2"}
    at_50 = {k for k in keys if Split("m", "1", "2", 50, sticky=True).choose(k) == "2"}
    assert at_10 and at_10 < at_50


def test_a_sticky_split_without_a_key_draws_at_random() -> None:
    split = Split("m", "1", "2", 50, sticky=True)
    assert {split.choose("", draw=lambda: 0.2), split.choose("", draw=lambda: 0.8)} == {"1", "2"}


def test_shares() -> None:
    assert CANARY_10.shares() == {"1": 90.0, "2": 10.0}
    assert Split("m", "1", shadow="3").shares() == {"1": 100.0}


def _window(outcomes: list[tuple[float, float, bool]], window_s: float = 10) -> Window:
    window = Window(window_s)
    for at, latency_s, ok in outcomes:
        window.add(at, latency_s, ok)
    return window


def test_the_error_ratio_breaks_only_with_enough_requests() -> None:
    guard = Guard(max_error_ratio=0.2, window_s=10, min_requests=10)
    few = _window([(t, 0.01, t % 2 == 0) for t in range(9)])
    assert breach(guard, few, now=9) is None  # half failed, but 9 < min_requests
    many = _window([(t / 2, 0.01, t % 4 != 0) for t in range(20)])  # 25% failed
    reason, why = breach(guard, many, now=9.9) or ("", "")
    assert reason == ERROR_RATIO and "0.250" in why


def test_the_window_forgets_what_is_older_than_it() -> None:
    guard = Guard(max_error_ratio=0.2, window_s=10, min_requests=5)
    window = _window(
        [(t, 0.01, False) for t in range(10)] + [(t, 0.01, True) for t in range(20, 30)]
    )
    assert breach(guard, window, now=29.5) is None  # the failures are 20 s old
    assert len(window) == 10


def test_the_p99_is_the_nearest_rank() -> None:
    window = _window([(0, ms / 1000, True) for ms in range(1, 101)])  # 1..100 ms
    assert window.p99_ms() == pytest.approx(99)
    guard = Guard(max_p99_ms=98, window_s=10, min_requests=50)
    assert (breach(guard, window, now=1) or ("",))[0] == P99_LATENCY
    assert breach(Guard(max_p99_ms=99, window_s=10, min_requests=50), window, now=1) is None


def test_a_guard_with_no_limit_is_inactive() -> None:
    assert not Guard().active
    assert Split("m", "1", "2", 10).guarded_canary == ""
    assert Split("m", "1", "2", 10, guard=Guard(max_error_ratio=0.1)).guarded_canary == "2"


def _policy(revision: int, **fields: object) -> policy_pb2.TrafficPolicy:
    return policy_pb2.TrafficPolicy(model="tiny", stable_version="1", revision=revision, **fields)  # type: ignore[arg-type]


def _book() -> PolicyBook:
    """A book that is never started: policies arrive through `apply`, as after a local write."""
    return PolicyBook(PolicyStore("127.0.0.1:1"), poll_s=1.0)


def test_the_book_keeps_the_newest_revision() -> None:
    book = _book()
    book.apply(_policy(5, canary_version="2", canary_percent=10))
    book.apply(_policy(3))  # an older read arriving late
    split = book.split("tiny")
    assert split is not None and (split.canary, split.revision) == ("2", 5)


def test_a_stored_guard_of_zeros_takes_the_defaults() -> None:
    guard = split_of(_policy(1, guard=policy_pb2.Guard(max_error_ratio=0.1))).guard
    assert (guard.window_s, guard.min_requests) == (60, 20)


def test_a_guarded_canary_gets_a_fresh_window_per_revision() -> None:
    book = _book()
    guarded = {
        "canary_version": "2",
        "canary_percent": 10,
        "guard": policy_pb2.Guard(max_error_ratio=0.1),
    }
    book.apply(_policy(1, **guarded))
    outcomes = Outcomes(book, clock=lambda: 100.0)
    outcomes.record("tiny", "2", False, 0.01)
    outcomes.record("tiny", "1", False, 0.01)  # the stable version is not judged
    split = book.split("tiny")
    assert split is not None and len(outcomes.window(split)) == 1
    book.apply(_policy(2, **guarded))
    split = book.split("tiny")
    assert split is not None and len(outcomes.window(split)) == 0
    assert outcomes.recent("tiny", "2") == (1, 1)


@pytest.fixture
def router(tmp_path: Path) -> Router:
    folder = tmp_path / "tiny"
    for version in ("1", "2", "3"):
        (folder / version).mkdir(parents=True)
        (folder / version / "config.json").write_text('{"id2label": {"0": "a", "1": "b"}}')
    (folder / "model.toml").write_text('task = "text-classification"\n')
    book = _book()
    book.apply(_policy(1, canary_version="2", canary_percent=100, shadow_version="3"))
    return Router(ModelRepository(tmp_path), 8, 100, book)


def test_the_policy_chooses_unless_the_request_names_a_version(router: Router) -> None:
    task = TaskName.TEXT_CLASSIFICATION
    assert router.route("tiny", "", task, False, 0).version == "2"  # the canary takes 100%
    assert router.route("tiny", "1", task, False, 0).version == "1"  # pinned
    assert router.route("tiny", "3", task, False, 0).version == "3"


def test_the_chosen_version_is_in_the_cache_key(router: Router) -> None:
    task = TaskName.TEXT_CLASSIFICATION
    chosen = router.route("tiny", "", task, False, 0)
    pinned = router.route("tiny", "1", task, False, 0)
    assert cache_key(chosen, "text") != cache_key(pinned, "text")
    assert cache_key(chosen, "text") == cache_key(router.route("tiny", "2", task, False, 0), "text")


def test_the_shadow_route_is_the_same_request_for_the_shadow_version(router: Router) -> None:
    route = router.route("tiny", "", TaskName.TEXT_CLASSIFICATION, False, 0)
    shadow = router.shadow(route)
    assert shadow is not None and shadow.version == "3" and shadow.task is route.task
    pinned_to_shadow = router.route("tiny", "3", TaskName.TEXT_CLASSIFICATION, False, 0)
    assert router.shadow(pinned_to_shadow) is None


class SlowStore(PolicyStore):
    """A store whose listing was read before a write that lands while it travels."""

    def __init__(self, listing: policy_pb2.ListPoliciesResponse) -> None:
        super().__init__("127.0.0.1:1")
        self.listing = listing

    async def all(self) -> policy_pb2.ListPoliciesResponse:
        return self.listing


async def test_a_read_older_than_a_local_write_does_not_undo_it() -> None:
    old = policy_pb2.ListPoliciesResponse(policies=[_policy(4)], revision=4)
    book = PolicyBook(SlowStore(old), poll_s=1.0)
    book.apply(_policy(5, canary_version="2", canary_percent=10))  # written after the read
    book.apply(policy_pb2.TrafficPolicy(model="new", stable_version="1", revision=6))
    await book.refresh()
    tiny, new = book.split("tiny"), book.split("new")
    assert tiny is not None and tiny.revision == 5 and new is not None
    book.store = SlowStore(policy_pb2.ListPoliciesResponse(policies=[_policy(7)], revision=7))
    await book.refresh()
    assert book.split("new") is None  # gone from the store since
    assert (book.split("tiny") or Split("", "")).revision == 7
