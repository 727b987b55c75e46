"""The README's Redis command keeps job records across a Redis crash: a Redis of its own, started
with that command (on a free port, in a temporary folder), is killed with SIGKILL after a job was
recorded through the cache service, started again, and still has the job."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from fmserve.cli.cluster import free_port
from fmserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2, jobs_pb2
from services.cache.__main__ import build
from tests.integration.conftest import settings_for

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_command() -> list[str]:
    """The `redis-server …` command the README tells users to run, as arguments."""
    text = " ".join(README.read_text().split())  # the command may wrap across lines
    found = re.search(r"`(redis-server --daemonize yes[^`]*)`", text)
    assert found, "the README no longer shows how to start Redis"
    return shlex.split(found.group(1))


def start(command: list[str], port: int, folder: Path) -> int:
    """Run the command on `port`, its files in `folder`; returns the server's pid when it
    answers."""
    args = [a if a != "6379" else str(port) for a in command]
    subprocess.run([*args, "--dir", str(folder), "--pidfile", str(folder / "pid")], check=True)
    with redis.Redis(port=port) as client:
        for _ in range(100):
            try:
                return int(client.info("server")["process_id"])
            except redis.ConnectionError:
                time.sleep(0.05)
    pytest.fail(f"Redis did not start on port {port}")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[list[str], int]]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the tests need it anyway)")
    command, port = readme_command(), free_port()
    assert "6379" in command
    start(command, port, tmp_path)
    yield command, port
    with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)


async def create_job(port: int) -> str:
    service = build(settings_for(f"redis://127.0.0.1:{port}/0", "persist:"))
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            job = jobs_pb2.Job(model="minilm-embed", task=common_pb2.TASK_EMBEDDING, retention_s=60)
            reply = await cache_pb2_grpc.CacheStub(channel).CreateJob(
                cache_pb2.CreateJobRequest(job=job), timeout=10
            )
            return str(reply.job.id)
    finally:
        await service.stop()


async def test_a_job_record_survives_a_redis_crash(
    own_redis: tuple[list[str], int], tmp_path: Path
) -> None:
    command, port = own_redis
    job_id = await create_job(port)
    time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)  # a crash: nothing flushed
    time.sleep(0.3)
    start(command, port, tmp_path)
    with redis.Redis(port=port) as client:
        keys = [k.decode() for k in client.scan_iter(match="persist:*")]
    assert any(job_id in key for key in keys), f"job {job_id} lost; keys left: {keys}"
