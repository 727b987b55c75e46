"""`fmserve up` as a user runs it: a subprocess that says `ready`, restarts a service that dies,
stops every child on SIGINT, and refuses to start without Redis, saying how to fix it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiormq
import pytest

from fmserve import Client
from fmserve.cli.certs import generate
from fmserve.cli.cluster import free_port
from fmserve.errors import Unavailable
from fmserve.queue.consumer import queue_depth
from fmserve.queue.topology import Topology, delete_queues
from tests.conftest import AMQP_URL, REDIS_URL, require_server
from tests.e2e.conftest import REDIS_DB, forget_keys

pytestmark = pytest.mark.e2e
T = TypeVar("T")


def _fmserve_up(base_port: int, log_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fmserve.cli",
            "up",
            "--base-port",
            str(base_port),
            "--log-dir",
            str(log_dir),
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(process: subprocess.Popen[str], pattern: str, timeout_s: float) -> list[str]:
    """Lines printed until one matches `pattern` (fails with the output if it never does)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line.rstrip())
        if re.search(pattern, line):
            return lines
    pytest.fail(f"never printed {pattern!r}; output:\n" + "\n".join(lines))


def _base_port() -> int:
    """Five consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base < 60000 and all(_free(base + i) for i in range(5)):
            return base
    pytest.fail("no five consecutive free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def up(tmp_path: Path, model_repository: Path) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    with _cluster(tmp_path, model_repository) as running:
        yield running


@contextmanager
def _cluster(
    log_dir: Path, model_repository: Path, extra: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    """`fmserve up` as a subprocess on its own ports, Redis keys and queues; gone afterwards."""
    require_server("Redis", "127.0.0.1", 6379)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    base = _base_port()
    name = f"fmserve-up-{uuid.uuid4().hex[:8]}"
    env = {
        "FMSERVE_MODEL_REPOSITORY": str(model_repository),
        "FMSERVE_REDIS_URL": f"{REDIS_URL}/{REDIS_DB}",
        "FMSERVE_CACHE_KEY_PREFIX": f"{name}:",
        "FMSERVE_AMQP_URL": AMQP_URL,
        # Queues of its own, deleted below: the default "fmserve." ones would outlive the test
        # on a shared RabbitMQ, and a real cluster there would share them.
        "FMSERVE_AMQP_QUEUE_PREFIX": f"{name}.",
        "FMSERVE_INFERENCE_PRELOAD": "minilm-embed",
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
        **(extra or {}),
    }
    process = _fmserve_up(base, log_dir, env)
    try:
        yield process, base, f"{name}."
    finally:
        # SIGINT, as a terminal's Ctrl-C: `fmserve up` stops its services (each in a session of
        # its own) before exiting; a SIGKILL would leave them running after a failed test.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()
        if process.stdout:
            process.stdout.close()
        _run(delete_queues(AMQP_URL, Topology(f"{name}.")))
        forget_keys(f"{name}:")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """In a thread of its own: this thread's event loop belongs to pytest-asyncio."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


async def _has_queues(prefix: str) -> bool:
    """Whether every queue of the topology under `prefix` exists (passive declarations)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        try:
            await queue_depth(connection, Topology(prefix).all_queues())
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    return True


def test_up_serves_restarts_and_stops_cleanly(
    up: tuple[subprocess.Popen[str], int, str],
) -> None:
    process, base, queue_prefix = up
    lines = _read_until(process, r"\bready\b", timeout_s=240)
    assert _run(_has_queues(queue_prefix))  # the services declared the test's own queues
    pids = {
        m[1]: int(m[2]) for line in lines if (m := re.match(r"\s+(\w+)\s+grpc .* pid (\d+)", line))
    }
    assert set(pids) == {"gateway", "preprocess", "inference", "postprocess", "cache"}
    assert ", TLS off (" in lines[-1]
    with Client(f"127.0.0.1:{base}") as client:
        assert client.embed(["hello from fmserve up"]).shape == (1, 384)

    os.kill(pids["postprocess"], signal.SIGKILL)
    _read_until(process, r"postprocess .* restarting", timeout_s=30)

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    time.sleep(0.5)
    assert not [name for name, pid in pids.items() if _alive(pid)]


def test_up_with_auth_and_certificates_shows_the_admin_key_and_serves_tls(
    tmp_path: Path, model_repository: Path
) -> None:
    certs = generate(tmp_path / "certs").folder
    env = {"FMSERVE_CERTS": str(certs), "FMSERVE_AUTH": "on"}
    with _cluster(tmp_path / "logs", model_repository, env) as running:
        process, base, _ = running
        lines = _read_until(process, r"\bready\b", timeout_s=240)
        assert "auth on: API keys required" in lines[-1]
        assert f"TLS on: gateway TLS, mTLS between services ({certs})" in lines[-1]
        shown = lines.index(next(line for line in lines if "first admin key" in line))
        admin_key = lines[shown + 1].strip()
        ca = (certs / "ca.crt").read_bytes()
        with Client(f"127.0.0.1:{base}", root_certificates=ca, api_key=admin_key) as client:
            assert client.embed(["hello over TLS"]).shape == (1, 384)
            assert "admin" in [key.name for key in client.api_keys()]
        with Client(f"127.0.0.1:{base}", timeout=5) as plain, pytest.raises(Unavailable):
            plain.models()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0


def test_up_starts_redis_and_runs_without_rabbitmq(tmp_path: Path, model_repository: Path) -> None:
    """No Redis at its URL but redis-server installed: started, and stopped with the cluster.
    No RabbitMQ it may start: the synchronous path runs, jobs are off, and both are said."""
    redis_port, amqp_port, base = free_port(), free_port(), _base_port()
    env = {
        "FMSERVE_MODEL_REPOSITORY": str(model_repository),
        "FMSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FMSERVE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
        "FMSERVE_INFERENCE_PRELOAD": "minilm-embed",
        "FMSERVE_INFERENCE_TORCH_THREADS": "1",
    }
    process = _fmserve_up(base, tmp_path / "logs", env)
    try:
        lines = _read_until(process, r"\bready\b", timeout_s=240)
        assert f"started Redis at 127.0.0.1:{redis_port} (stopped with the cluster)" in lines
        off = f"running without batch jobs (RabbitMQ is not reachable at 127.0.0.1:{amqp_port}"
        assert off in lines[-1]
        with Client(f"127.0.0.1:{base}") as client:
            assert client.embed(["no jobs, but answers"]).shape == (1, 384)
            with pytest.raises(Unavailable, match="batch jobs are off"):
                client.submit(["a job"], model="minilm-embed")
        assert (tmp_path / "redis" / "appendonlydir").is_dir()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert not _listening(redis_port)
    finally:
        # SIGINT, as a terminal's Ctrl-C: `fmserve up` stops its services (each in a session of
        # its own) before exiting; a SIGKILL would leave them running after a failed test.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()
        if process.stdout:
            process.stdout.close()


def _listening(port: int) -> bool:
    return not _free(port)
