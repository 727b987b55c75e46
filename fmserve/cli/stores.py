"""The two servers a local cluster stands on, as `fmserve up` finds them: Redis (the result cache
and job records) and RabbitMQ (batch jobs).

Each is used where its URL answers. When it does not, and the URL points at this machine and the
server is installed, `fmserve up` starts it: Redis as a child process with its append-only file
in `.fmserve/redis/` (job records survive a restart), RabbitMQ detached on its default port;
both are stopped again with the cluster. Otherwise the cluster runs without what needs the
missing server (no Redis: no result cache and no jobs; no RabbitMQ: no jobs), and the ready line
says what is off and how to turn it on.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
REDIS_START_S = 10.0
RABBITMQ_START_S = 90.0  # an Erlang node takes a while, more on a first start
RABBITMQ_PORT = 5672
STAGES = ("PREPROCESS", "INFERENCE", "POSTPROCESS")


@dataclass
class Store:
    """One backing server: where it is, and whether it answers, was started here, or is off."""

    name: str
    address: str
    state: str = "reachable"
    """reachable, started (by `fmserve up`, stopped with it) or off."""
    hint: str = ""
    """When off: how to turn it on."""
    process: subprocess.Popen[bytes] | None = None
    stop_command: tuple[str, ...] = ()

    @property
    def on(self) -> bool:
        return self.state != "off"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # Redis flushes its append-only file on SIGTERM
            self.process.wait(timeout=30)
            self.process = None
        if self.stop_command:
            subprocess.run(self.stop_command, capture_output=True, timeout=120, check=False)
            self.stop_command = ()


def redis(url: str, data_dir: Path, log_dir: Path) -> Store:
    host, port = _where(url, 6379)
    store = Store("Redis", f"{host}:{port}")
    if _reachable(host, port):
        return store
    if not _may_start(host, port, "redis-server"):
        return _off(store, "FMSERVE_REDIS_URL", "redis-server", "redis-server")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    command = ["redis-server", "--bind", host, "--port", str(port), "--appendonly", "yes"]
    with (log_dir / "redis.log").open("ab") as log:
        store.process = subprocess.Popen(
            [*command, "--dir", str(data_dir.resolve())],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor, which stops it
        )
    return _started(store, host, port, REDIS_START_S)


def rabbitmq(url: str) -> Store:
    host, port = _where(url, RABBITMQ_PORT)
    store = Store("RabbitMQ", f"{host}:{port}")
    if _reachable(host, port):
        return store
    if port != RABBITMQ_PORT or not _may_start(host, port, "rabbitmq-server"):
        return _off(store, "FMSERVE_AMQP_URL", "rabbitmq-server", "rabbitmq-server -detached")
    started = subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)
    if started.returncode != 0:
        store.state = "off"
        store.hint = f"`rabbitmq-server -detached` failed ({started.returncode}): start it by hand"
        return store
    store.stop_command = ("rabbitmqctl", "shutdown")
    return _started(store, host, port, RABBITMQ_START_S)


def cluster_env(redis: Store, rabbitmq: Store) -> dict[str, str]:
    """Settings that turn off what a missing server would break: jobs need both."""
    if redis.on and rabbitmq.on:
        return {}
    env = {"FMSERVE_GATEWAY_JOBS_ENABLED": "false"}
    env.update({f"FMSERVE_{stage}_WORKER_ENABLED": "false" for stage in STAGES})
    return env


def what_is_off(redis: Store, rabbitmq: Store) -> str:
    """For the ready line: what the cluster runs without, why, and how to turn it on."""
    off = []
    if not redis.on:
        off.append(f"the result cache and batch jobs ({redis.hint})")
    if not rabbitmq.on:
        off.append(f"batch jobs ({rabbitmq.hint})")
    return "; ".join(off)


def _where(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def _may_start(host: str, port: int, binary: str) -> bool:
    """Only a server of this machine, on a port a user may bind, with its program installed."""
    return host in LOOPBACK and port >= 1024 and shutil.which(binary) is not None


def _off(store: Store, variable: str, binary: str, start: str) -> Store:
    store.state = "off"
    # Only host and port: the URL may hold a password.
    how = f"start it with `{start}`" if shutil.which(binary) else f"install {binary}"
    store.hint = f"{store.name} is not reachable at {store.address}: {how}, or set {variable}"
    return store


def _started(store: Store, host: str, port: int, wait_s: float) -> Store:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _reachable(host, port):
            store.state = "started"
            return store
        time.sleep(0.2)
    store.stop()
    store.state = "off"
    store.hint = f"{store.name} was started at {store.address} but never answered (see its log)"
    return store
