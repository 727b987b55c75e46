"""The lifecycle every service shares: a grpc.aio server with the standard health service,
reflection, the service interceptor, a /metrics endpoint, and an ordered graceful stop. The
server listens with TLS when the settings name certificates: a public service (the gateway)
serves any client, the others only clients with a certificate the cluster's CA signed."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fmserve.core import logs, tracing
from fmserve.core.metrics import RpcMetrics, serve_metrics
from fmserve.core.settings import ServiceSettings
from fmserve.rpc import reflection, tls
from fmserve.rpc.interceptors import ServiceInterceptor
from fmserve.rpc.options import grpc_options
from fmserve.rpc.tunnel_server import SERVICE as TUNNEL_SERVICE
from fmserve.rpc.tunnel_server import HandlerRecorder, TunnelServicer
from fmserve.rpc.wrapping import MethodWrapper
from fmserve.v1 import tunnel_pb2_grpc

log = logging.getLogger("fmserve.rpc.service")


class Resource(Protocol):
    """Something a service starts before serving and stops after its calls have drained."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Draining(Protocol):
    """A resource told when the calls start draining: it may end long calls (streams) its own
    way before the grace is over, rather than have the server cut them."""

    async def drain(self, grace_s: float) -> None: ...


@dataclass
class Servicer:
    """A servicer object, the generated function that adds it, and its full service name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str


def server_options(settings: ServiceSettings) -> list[tuple[str, Any]]:
    """`grpc_options` with the request bound (gRPC applies it to the decompressed message), plus
    a maximum connection age: a client learns of new replicas only when it re-resolves DNS,
    which it does when a connection closes (gRPC adds ±10% jitter)."""
    options = grpc_options(settings.max_message_bytes, settings.max_request_bytes)
    # gRPC's own soft limit (8 KiB) refuses calls between it and the hard one (16 KiB) at
    # random; one limit for both makes the bound exact.
    options.append(("grpc.max_metadata_size", settings.max_metadata_bytes))
    options.append(("grpc.absolute_max_metadata_size", settings.max_metadata_bytes))
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
    return options


@dataclass
class Service:
    """One service process: `start()` binds and serves, `stop()` drains and exits in order."""

    name: str
    settings: ServiceSettings
    servicers: list[Servicer]
    resources: list[Resource] = field(default_factory=list)
    port: int = 0
    metrics_port: int | None = None
    public: bool = False
    """Serves clients outside the cluster: with TLS on, no client certificate is asked for."""
    interceptors: list[MethodWrapper] = field(default_factory=list)
    """Inside the service interceptor (which maps their errors to statuses and binds each call's
    metadata in `fmserve.core.context.metadata`, where the gateway's auth reads the key), in
    order: the gateway's auth."""

    def __post_init__(self) -> None:
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics = RpcMetrics(self.name)
        self._tunnel: TunnelServicer | None = None

    @property
    def tunnel(self) -> TunnelServicer | None:
        """The stages' `fmserve.v1.Tunnel` servicer, once serving; None for the gateway."""
        return self._tunnel

    async def start(self) -> None:
        tracing.configure(self.name, self.settings.otlp_endpoint)
        for resource in self.resources:
            await resource.start()
        interceptors = [ServiceInterceptor(self.name, self._metrics), *self.interceptors]
        server = grpc.aio.server(interceptors=interceptors, options=server_options(self.settings))
        recorder = HandlerRecorder(server)
        for s in self.servicers:
            s.add_to_server(s.servicer, recorder)
        names = [s.name for s in self.servicers]
        if not self.public:  # the stages: the gateway's calls come on the tunnel
            self._tunnel = TunnelServicer(
                recorder.handlers,
                interceptors,
                self.settings.max_message_bytes,
                self.settings.max_metadata_bytes,
            )
            tunnel_pb2_grpc.add_TunnelServicer_to_server(self._tunnel, server)
            names.append(TUNNEL_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable([*names, health.SERVICE_NAME], server)
        self.port = self._listen(server)
        await server.start()
        self._server = server
        self.metrics_port = serve_metrics(self.settings.metrics_port, self.settings.host)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "tls": self._tls_mode(),
            },
        )

    def _listen(self, server: grpc.aio.Server) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        identity = tls.load(self.settings)
        if identity is None:
            return server.add_insecure_port(address)
        credentials = identity.server_credentials(require_client_auth=not self.public)
        return server.add_secure_port(address, credentials)

    def _tls_mode(self) -> str:
        if not self.settings.tls_enabled:
            return "off"
        return "server" if self.public else "mutual"

    async def stop(self) -> None:
        """Health NOT_SERVING first (balancers move away), drain calls, then close resources."""
        if self._server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            grace = self.settings.grace_period_s
            draining = [r for r in [*self.resources, self._tunnel] if isinstance(r, Draining)]
            drains = [asyncio.create_task(r.drain(grace)) for r in draining]
            await self._server.stop(grace)
            for drain in drains:
                drain.cancel()
            self._server = None
        for resource in reversed(self.resources):
            await resource.stop()
        tracing.shutdown()
        log.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ["", *(s.name for s in self.servicers)]:
            await self._health.set(name, status)


def main(settings: ServiceSettings, build: Callable[[Any], Service], name: str) -> None:
    """A service process's life: JSON logs, its settings logged once, then serve until
    SIGTERM or SIGINT and stop gracefully. Every service's `__main__` ends here."""
    logs.configure(name, settings.log_level, settings.log_format)
    log.info("settings", extra={"service": name, "settings": settings.model_dump(mode="json")})
    asyncio.run(run_until_signalled(build(settings)))


async def run_until_signalled(service: Service) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully. Only entry points call this."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await service.start()
    await stopping.wait()
    log.info("signal received, stopping", extra={"grace_period_s": service.settings.grace_period_s})
    await service.stop()
