"""How `fmserve up` finds Redis and RabbitMQ (fmserve/cli/stores.py): used where they answer,
Redis started (and stopped) where it is installed and its URL is this machine's, and otherwise
off, with what that turns off and how to turn it on. Nothing here touches the shared servers: the
ports are free ones."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fmserve.cli import stores
from fmserve.cli.cluster import free_port
from tests.conftest import REDIS_URL, require_server

pytestmark = pytest.mark.timeout(60)


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_redis_that_answers_is_used_as_it_is(tmp_path: Path) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    store = stores.redis(REDIS_URL, tmp_path / "redis", tmp_path / "logs")
    assert store.state == "reachable" and store.process is None


def test_an_installed_redis_is_started_with_an_append_only_file_and_stopped(
    tmp_path: Path,
) -> None:
    port = free_port()
    store = stores.redis(f"redis://127.0.0.1:{port}/0", tmp_path / "redis", tmp_path / "logs")
    try:
        assert store.state == "started"
        assert answers(port)
        assert (tmp_path / "redis" / "appendonlydir").is_dir()
    finally:
        store.stop()
    assert not answers(port)


def test_a_redis_it_may_not_start_is_off_and_says_how_to_turn_it_on(tmp_path: Path) -> None:
    store = stores.redis("redis://:secret@127.0.0.1:1/0", tmp_path / "redis", tmp_path / "logs")
    assert store.state == "off"
    assert "Redis is not reachable at 127.0.0.1:1" in store.hint
    assert "FMSERVE_REDIS_URL" in store.hint
    assert "secret" not in store.hint


def test_rabbitmq_off_its_default_port_is_never_started() -> None:
    port = free_port()
    store = stores.rabbitmq(f"amqp://guest:guest@127.0.0.1:{port}/")
    assert store.state == "off" and not store.stop_command
    assert f"RabbitMQ is not reachable at 127.0.0.1:{port}" in store.hint


def test_a_missing_server_turns_off_jobs_and_says_so() -> None:
    on = stores.Store("Redis", "127.0.0.1:6379")
    rabbit_off = stores.Store("RabbitMQ", "127.0.0.1:5", state="off", hint="no RabbitMQ")
    redis_off = stores.Store("Redis", "127.0.0.1:1", state="off", hint="no Redis")
    assert stores.cluster_env(on, stores.Store("RabbitMQ", "127.0.0.1:5672")) == {}
    env = stores.cluster_env(on, rabbit_off)
    assert env["FMSERVE_GATEWAY_JOBS_ENABLED"] == "false"
    assert {env[f"FMSERVE_{s}_WORKER_ENABLED"] for s in stores.STAGES} == {"false"}
    assert stores.cluster_env(redis_off, stores.Store("RabbitMQ", "x")) == env
    assert stores.what_is_off(on, rabbit_off) == "batch jobs (no RabbitMQ)"
    assert stores.what_is_off(redis_off, on) == "the result cache and batch jobs (no Redis)"
