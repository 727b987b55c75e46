"""Shadow traffic: a copy of a request goes to the model's shadow version in the background;
its answer is counted (outcomes.py), never returned, never cached. At most `max_in_flight`
copies run at once; past that a copy is dropped (and counted), so a slow shadow version never
holds up or piles onto the versions that answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from services.gateway.outcomes import Outcomes
from services.gateway.pipeline import Input, Pipeline
from services.gateway.routes import Route

log = logging.getLogger("fmserve.gateway.shadow")


class Shadow:
    """A resource: `stop` cancels the copies still running."""

    def __init__(
        self, pipeline: Pipeline, outcomes: Outcomes, max_in_flight: int, timeout_s: float
    ) -> None:
        self.pipeline = pipeline
        self.outcomes = outcomes
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._copies: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for task in self._copies:
            task.cancel()
        await asyncio.gather(*self._copies, return_exceptions=True)

    def mirror(self, route: Route, inputs: Sequence[Input]) -> None:
        """Send a copy of the inputs (texts or media) to `route` (the shadow version's),
        without waiting."""
        if len(self._copies) >= self.max_in_flight:
            self.outcomes.record_shadow(route.model, route.version, "dropped")
            return
        task = asyncio.create_task(self._run(route, inputs))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _run(self, route: Route, inputs: Sequence[Input]) -> None:
        try:
            await self.pipeline.run(route, inputs, time.monotonic() + self.timeout_s)
        except Exception as exc:  # any failure is the shadow version's outcome, never the caller's
            log.debug("a shadow copy failed: %s", exc, extra={"version": route.version})
            self.outcomes.record_shadow(route.model, route.version, "error")
            return
        self.outcomes.record_shadow(route.model, route.version, "ok")
