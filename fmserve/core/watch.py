"""Watching the model repository: a resource that rereads it every `poll_s` in a thread, so new
model folders, version folders added or removed, and edited model.tomls are seen within a poll
while requests read the configs from memory (fmserve.core.repository)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fmserve.core.repository import ModelRepository
from fmserve.core.settings import RepositorySettings

log = logging.getLogger("fmserve.repository")


class RepositoryWatcher:
    """Owns the refreshes of one repository; a Resource of every service that reads it."""

    def __init__(self, repository: ModelRepository, poll_s: float) -> None:
        self.repository = repository
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, settings: RepositorySettings) -> RepositoryWatcher:
        """The watcher of the repository the settings name."""
        repository = ModelRepository(settings.model_repository, settings.converted_cache)
        return cls(repository, settings.repository_poll_s)

    async def start(self) -> None:
        await asyncio.to_thread(self.repository.refresh)
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await asyncio.to_thread(self.repository.refresh)
            except Exception:  # a filesystem hiccup must not end the watching
                log.exception("rereading the model repository failed; trying again")
