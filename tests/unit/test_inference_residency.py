"""Choosing the versions that make room (services/inference/residency.py): least recently used
first, only evictable ones, until both the count and the memory budget hold."""

from __future__ import annotations

import pytest

from fmserve.errors import Overloaded
from services.inference.residency import MB, Limits, Resident, victims

pytestmark = pytest.mark.timeout(10)


def resident(version: str, mb: float, last_used: float, evictable: bool = True) -> Resident:
    return Resident(("m", version), int(mb * MB), last_used, evictable)


def test_nothing_goes_while_everything_fits() -> None:
    loaded = [resident("1", 4, 1.0), resident("2", 4, 2.0)]
    assert victims(loaded, 1 * MB, Limits(8, 10 * MB), "v3") == []


def test_the_least_recently_used_go_until_the_budget_holds() -> None:
    loaded = [resident("1", 4, 3.0), resident("2", 4, 1.0), resident("3", 4, 2.0)]
    assert victims(loaded, 4 * MB, Limits(8, 13 * MB), "v4") == [("m", "2")]
    assert victims(loaded, 8 * MB, Limits(8, 13 * MB), "v4") == [("m", "2"), ("m", "3")]


def test_the_count_limit_holds_alongside_without_a_budget() -> None:
    loaded = [resident("1", 4, 2.0), resident("2", 4, 1.0)]
    assert victims(loaded, 4 * MB, Limits(2), "v3") == [("m", "2")]


def test_busy_or_pinned_versions_never_go() -> None:
    loaded = [resident("1", 4, 1.0, evictable=False), resident("2", 4, 2.0)]
    assert victims(loaded, 4 * MB, Limits(8, 9 * MB), "v3") == [("m", "2")]
    with pytest.raises(Overloaded, match=r"needs 6\.0 MB and 8\.0 MB of the 9\.0 MB memory budget"):
        victims(
            [resident("1", 4, 1.0, False), resident("2", 4, 2.0, False)],
            6 * MB,
            Limits(8, 9 * MB),
            "v3",
        )


def test_a_version_larger_than_the_whole_budget_is_refused_at_once() -> None:
    with pytest.raises(Overloaded, match=r"v1 needs 12\.0 MB, more than the whole memory budget"):
        victims([], 12 * MB, Limits(8, 10 * MB), "v1")
