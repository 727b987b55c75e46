"""Automatic rollback: a few times a second, each guarded canary's window (outcomes.py) is
judged against its guard (guard.py); a canary that breaks it is rolled back, with the reason in
the log, `fmserve_gateway_rollbacks_total{model,reason}` and so the dashboard's annotation.

Each replica judges the requests it routed itself. When several see a breach at once, the
compare-and-set on the policy's revision lets one roll back; the others find it changed."""

from __future__ import annotations

import asyncio
import logging
import time

from fmserve.errors import Conflict, FmserveError
from services.gateway.guard import breach
from services.gateway.outcomes import Outcomes
from services.gateway.policies import PolicyBook
from services.gateway.rollouts import Rollouts

log = logging.getLogger("fmserve.gateway.guardian")


class Guardian:
    """A resource: `start` begins judging every `interval_s`."""

    def __init__(
        self, book: PolicyBook, outcomes: Outcomes, rollouts: Rollouts, interval_s: float
    ) -> None:
        self.book = book
        self.outcomes = outcomes
        self.rollouts = rollouts
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def judge(self) -> None:
        """Roll back every guarded canary that breaks its guard now."""
        for split in self.book.splits():
            if not split.guarded_canary:
                continue
            broken = breach(split.guard, self.outcomes.window(split), time.monotonic())
            if broken is None:
                continue
            label, why = broken
            try:
                await self.rollouts.rollback(
                    split.model, f"canary {split.canary}: {why}", label, split.revision
                )
            except Conflict:
                continue  # another replica (or an admin) changed the policy first

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.judge()
            except FmserveError as error:
                log.warning("could not roll back a canary that broke its guard: %s", error.message)
