"""What each model version answered, as this gateway saw it: Prometheus counters and latency
per version, per-second counts over the last `RECENT_S` (for `fmserve models --versions`), and
the window of a guarded canary (for the `Guardian`). A request costs a few dict lookups and
appends."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from services.gateway.guard import Window
from services.gateway.metrics import SHADOW_REQUESTS, VERSION_LATENCY, VERSION_REQUESTS
from services.gateway.policies import PolicyBook
from services.gateway.traffic import Split

RECENT_S = 300
"""How far back the per-version request and error counts go."""

Key = tuple[str, str]  # (model, version)


class Outcomes:
    def __init__(self, policies: PolicyBook, clock: Callable[[], float] = time.monotonic):
        self.policies = policies
        self.clock = clock
        self._seconds: dict[Key, deque[list[int]]] = {}
        self._windows: dict[str, tuple[int, str, Window]] = {}

    def record(self, model: str, version: str, ok: bool, latency_s: float) -> None:
        """A request the version answered (ok) or failed."""
        VERSION_REQUESTS.labels(model, version, "ok" if ok else "error").inc()
        VERSION_LATENCY.labels(model, version).observe(latency_s)
        now = self.clock()
        self._count(model, version, ok, now)
        split = self.policies.split(model)
        if split is not None and version == split.guarded_canary:
            self.window(split).add(now, latency_s, ok)

    def record_shadow(self, model: str, version: str, outcome: str) -> None:
        """A copy sent to a shadow version: ok, error or dropped."""
        SHADOW_REQUESTS.labels(model, version, outcome).inc()
        if outcome != "dropped":
            self._count(model, version, outcome == "ok", self.clock())

    def window(self, split: Split) -> Window:
        """The guarded canary's window, new for each revision of its policy."""
        revision, version, window = self._windows.get(split.model, (-1, "", Window(0)))
        if (revision, version) != (split.revision, split.guarded_canary):
            window = Window(split.guard.window_s)
            self._windows[split.model] = (split.revision, split.guarded_canary, window)
        return window

    def recent(self, model: str, version: str) -> tuple[int, int]:
        """(requests, errors) over the last RECENT_S seconds."""
        seconds = self._seconds.get((model, version), ())
        since = int(self.clock()) - RECENT_S
        kept = [s for s in seconds if s[0] > since]
        return sum(s[1] for s in kept), sum(s[2] for s in kept)

    def _count(self, model: str, version: str, ok: bool, now: float) -> None:
        seconds = self._seconds.setdefault((model, version), deque())
        second = int(now)
        if not seconds or seconds[-1][0] != second:
            seconds.append([second, 0, 0])
            while seconds[0][0] <= second - RECENT_S:
                seconds.popleft()
        seconds[-1][1] += 1
        seconds[-1][2] += 0 if ok else 1
