"""Guard window math: a canary's outcomes over the last `window_s` seconds, and whether they
break its guard (too many errors, or a p99 latency over the limit, once the window holds
enough requests). Fed by `Outcomes` on every request the canary answers; judged by the
`Guardian` a few times a second, so a request pays an append and nothing more."""

from __future__ import annotations

import math
from collections import deque

from services.gateway.traffic import Guard

ERROR_RATIO = "error_ratio"
P99_LATENCY = "p99_latency"


class Window:
    """(time, latency, ok) of each request, the oldest dropped once out of the window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._outcomes: deque[tuple[float, float, bool]] = deque()

    def add(self, now: float, latency_s: float, ok: bool) -> None:
        self._outcomes.append((now, latency_s, ok))

    def trim(self, now: float) -> None:
        while self._outcomes and self._outcomes[0][0] <= now - self.window_s:
            self._outcomes.popleft()

    def __len__(self) -> int:
        return len(self._outcomes)

    def error_ratio(self) -> float:
        if not self._outcomes:
            return 0.0
        return sum(1 for _, _, ok in self._outcomes if not ok) / len(self._outcomes)

    def p99_ms(self) -> float:
        """The nearest-rank 99th percentile of the window's latencies, in milliseconds."""
        if not self._outcomes:
            return 0.0
        latencies = sorted(latency for _, latency, _ in self._outcomes)
        return latencies[math.ceil(0.99 * len(latencies)) - 1] * 1000


def breach(guard: Guard, window: Window, now: float) -> tuple[str, str] | None:
    """(reason label, why in words) when the window breaks the guard, else None."""
    window.trim(now)
    if len(window) < guard.min_requests:
        return None
    ratio = window.error_ratio()
    if guard.max_error_ratio > 0 and ratio > guard.max_error_ratio:
        return ERROR_RATIO, (
            f"error ratio {ratio:.3f} over {len(window)} requests in {guard.window_s:g} s "
            f"exceeds {guard.max_error_ratio:g}"
        )
    p99 = window.p99_ms() if guard.max_p99_ms > 0 else 0.0
    if p99 > guard.max_p99_ms > 0:
        return P99_LATENCY, (
            f"p99 latency {p99:.1f} ms over {len(window)} requests in {guard.window_s:g} s "
            f"exceeds {guard.max_p99_ms:g} ms"
        )
    return None
