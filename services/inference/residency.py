"""Which loaded versions make room for one more: the least recently used of those that may go
(idle, READY, not pinned), until both the count (`max_loaded_models`) and the memory budget
hold again. Pure: the registry says what is resident, and gets the keys to unload, or
Overloaded (RESOURCE_EXHAUSTED) saying what holds the room."""

from __future__ import annotations

from dataclasses import dataclass

from fmserve.errors import Overloaded

Key = tuple[str, str]  # (model name, version)
MB = 1_000_000


@dataclass(frozen=True)
class Resident:
    key: Key
    bytes: int
    last_used: float
    evictable: bool
    """Idle, READY and not pinned."""


@dataclass(frozen=True)
class Limits:
    max_versions: int
    budget_bytes: int = 0
    """0: no memory budget."""


def victims(residents: list[Resident], need_bytes: int, limits: Limits, what: str) -> list[Key]:
    """The versions to unload so that `what`, needing `need_bytes`, fits beside the rest."""
    budget = limits.budget_bytes
    if budget and need_bytes > budget:
        raise Overloaded(
            f"{what} needs {_mb(need_bytes)} MB, more than the whole memory budget of "
            f"{_mb(budget)} MB (FMSERVE_INFERENCE_MEMORY_BUDGET_MB)"
        )
    held = sum(r.bytes for r in residents)
    extra_versions = len(residents) + 1 - limits.max_versions
    extra_bytes = held + need_bytes - budget if budget else 0
    chosen = []
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if extra_versions <= 0 and extra_bytes <= 0:
            break
        chosen.append(resident.key)
        extra_versions -= 1
        extra_bytes -= resident.bytes
    if extra_versions > 0:
        raise Overloaded(
            f"{len(residents)} model versions are loaded and none can be unloaded now (busy or "
            "pinned); retry shortly (or raise FMSERVE_INFERENCE_MAX_LOADED_MODELS)"
        )
    if extra_bytes > 0:
        raise Overloaded(
            f"{what} needs {_mb(need_bytes)} MB and {_mb(held)} MB of the {_mb(budget)} MB memory "
            "budget are held by versions that cannot be unloaded now (busy or pinned); retry "
            "shortly, unload a pinned version, or raise FMSERVE_INFERENCE_MEMORY_BUDGET_MB"
        )
    return chosen


def _mb(size: int) -> str:
    return f"{size / MB:.1f}"
