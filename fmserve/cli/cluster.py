"""`fmserve up`: the whole cluster as local processes, one per service replica.

The supervisor checks Redis first, starts every service, waits for each one's gRPC health
check, restarts a service that dies (as compose's `restart: unless-stopped` would) and stops
everything in order on Ctrl-C or SIGTERM: the gateway first, so no new work enters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmserve.core.settings import service_module
from fmserve.rpc import tls

# Start order: stages first, the gateway (the front door) last; stop order is the reverse.
SERVICES = ("cache", "preprocess", "inference", "postprocess", "gateway")
# Default ports (README, "Configuration"): gateway 50051, preprocess 50052, … cache 50055.
PORT_ORDER = ("gateway", "preprocess", "inference", "postprocess", "cache")
DEFAULT_PORTS = {name: 50051 + i for i, name in enumerate(PORT_ORDER)}
# `fmserve up` puts each service's /metrics at its gRPC port + this: 50051 → 9151, 50052 → 9152…
METRICS_PORT_OFFSET = 9100 - 50000


class ClusterError(RuntimeError):
    """The cluster cannot start; the message says why and what to do."""


@dataclass
class Replica:
    service: str
    port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """Owns the child processes. `start()` returns once every replica is healthy."""

    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    replicas: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """The first replica's /metrics port per service; the others (and services not named
    here) take a free port."""
    log_dir: Path = Path(".fmserve/logs")
    certs: Path | None = None
    """A folder `fmserve certs` wrote: each service gets its own certificate from it (TLS at
    the gateway, mTLS between services); None: plaintext."""
    say: Callable[[str], None] = print
    replicas_of: dict[str, list[Replica]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            count = self.replicas.get(service, 1)
            base = self.ports[service]
            self.replicas_of[service] = [
                Replica(
                    service,
                    base if i == 0 else free_port(),
                    (self.metrics_ports.get(service) or free_port()) if i == 0 else free_port(),
                    self.log_dir / (f"{service}.log" if count == 1 else f"{service}-{i}.log"),
                )
                for i in range(count)
            ]

    def all(self) -> list[Replica]:
        return [r for s in SERVICES for r in self.replicas_of[s]]

    def address(self, service: str) -> str:
        return ",".join(r.address for r in self.replicas_of[service])

    def start(self, timeout_s: float = 180.0) -> None:
        for replica in self.all():
            self.spawn(replica)
        deadline = time.monotonic() + timeout_s
        for replica in self.all():
            self.wait_healthy(replica, deadline)

    def spawn(self, replica: Replica) -> None:
        log = replica.log_path.open("ab")
        replica.process = subprocess.Popen(
            [sys.executable, "-m", service_module(replica.service)],
            env=self.child_env(replica),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C reaches the supervisor alone, which then stops
            # the children in order instead of racing them.
            start_new_session=True,
        )
        log.close()

    def child_env(self, replica: Replica) -> dict[str, str]:
        prefix = f"FMSERVE_{replica.service.upper()}_"
        env = {**os.environ, **self.env}
        env[prefix + "PORT"] = str(replica.port)
        env[prefix + "METRICS_PORT"] = str(replica.metrics_port)
        env[prefix + "HOST"] = "127.0.0.1"
        # TLS comes from the certificate folder alone: a CA the shell names for the CLI
        # (FMSERVE_TLS_CA) does not reach the services, so the ready line's "TLS off" holds.
        for variable in ("FMSERVE_TLS_CERT", "FMSERVE_TLS_KEY", "FMSERVE_TLS_CA"):
            env.pop(variable, None)
        env.update(self._tls_env(replica.service))
        for stage in ("preprocess", "inference", "postprocess", "cache"):
            env.setdefault(f"FMSERVE_GATEWAY_{stage.upper()}_ADDRESS", self.address(stage))
        # The stages' job workers read job states from, and record items in, the cache service.
        for stage in ("preprocess", "inference", "postprocess"):
            env.setdefault(f"FMSERVE_{stage.upper()}_CACHE_ADDRESS", self.address("cache"))
        # A gateway keeps at most its batches in flight of inference replicas busy per model:
        # two per replica (the default for one, the best measured on one machine).
        inference = len(self.replicas_of["inference"])
        if inference > 1:
            env.setdefault("FMSERVE_GATEWAY_MAX_BATCHES_IN_FLIGHT", str(2 * inference))
        # Its calls to a stage travel on streams kept open, each on one replica: two per replica
        # of the most scaled stage (the default, 4, covers two).
        most = max(len(self.replicas_of[s]) for s in ("preprocess", "inference", "postprocess"))
        if most > 2:
            env.setdefault("FMSERVE_GATEWAY_STAGE_STREAMS", str(2 * most))
        return env

    def _tls_env(self, service: str) -> dict[str, str]:
        """The service's own certificate from the folder; none without one."""
        if self.certs is None:
            return {}
        return {
            "FMSERVE_TLS_CERT": str(self.certs / f"{service}.crt"),
            "FMSERVE_TLS_KEY": str(self.certs / f"{service}.key"),
            "FMSERVE_TLS_CA": str(self.certs / "ca.crt"),
        }

    def wait_healthy(self, replica: Replica, deadline: float) -> None:
        with self.channel(replica.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(replica)
                if _serving(stub):
                    return
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{replica.service} did not become healthy; see {replica.log_path}"
                    )
                time.sleep(0.2)

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to one service, with the `client` certificate when TLS is on."""
        if self.certs is None:
            return grpc.insecure_channel(address)
        credentials = tls.from_folder(self.certs, "client").channel_credentials()
        return grpc.secure_channel(address, credentials)

    def _check_alive(self, replica: Replica) -> None:
        if replica.process is not None and replica.process.poll() is not None:
            tail = _tail(replica.log_path)
            raise ClusterError(
                f"{replica.service} exited with code {replica.process.returncode} while starting; "
                f"last lines of {replica.log_path}:\n{tail}"
            )

    def supervise_once(self) -> None:
        """Restart every replica that has exited since the last look."""
        for replica in self.all():
            if replica.process is not None and replica.process.poll() is not None:
                replica.restarts += 1
                self.say(
                    f"{replica.service} on {replica.address} exited with code "
                    f"{replica.process.returncode}; restarting it (restart {replica.restarts})"
                )
                self.spawn(replica)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM in reverse start order (gateway first), then SIGKILL what outlives the grace."""
        for replica in reversed(self.all()):
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
                _wait(replica.process, grace_s)


def _wait(process: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_ports(cluster: Cluster) -> None:
    for replica in cluster.all():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", replica.port))
            except OSError:
                raise ClusterError(
                    f"port {replica.port} ({replica.service}) is already in use: is another "
                    "fmserve running? Stop it, or choose other ports."
                ) from None
