"""Fixtures every layer shares: the test model repository and the real Redis/RabbitMQ servers.

A missing server (or program) skips its tests on a developer's machine but fails them in CI
(CI=true)."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.models import build_repository

REDIS_URL = os.environ.get("FMSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("FMSERVE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    if not _reachable(host, port):
        _missing(f"{name} is not reachable at {host}:{port}")


def require_binary(name: str, package: str) -> str:
    """The path of a program the tests run (a server, a checker), from PATH."""
    found = shutil.which(name)
    if found is None:
        _missing(f"{name} is not on PATH (apt-get install {package})")
    return str(found)


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must provide it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_server("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


class AsyncioReports:
    """What asyncio hands its loop's exception handler while a test runs. Each would be an ERROR
    line in a service's log: "Future exception was never retrieved", "Task exception was never
    retrieved", "Task was destroyed but it is pending", an exception in a callback."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    async def messages(self) -> list[str]:
        """The reports so far, once pending callbacks have run and garbage is collected:
        asyncio reports an exception nobody retrieved only when its future is freed."""
        for _ in range(3):
            await asyncio.sleep(0.01)
            gc.collect()
        return [f"{c.get('message')}: {c.get('exception')!r}" for c in self.contexts]


@pytest.fixture
async def asyncio_reports() -> AsyncIterator[AsyncioReports]:
    """Records the reports of the test's event loop (and still logs them, as asyncio does)."""
    loop = asyncio.get_running_loop()
    reports = AsyncioReports()

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        reports.contexts.append(context)
        loop.default_exception_handler(context)

    previous = loop.get_exception_handler()
    loop.set_exception_handler(record)
    yield reports
    loop.set_exception_handler(previous)
