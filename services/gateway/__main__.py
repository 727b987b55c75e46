"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

import asyncio
import logging

from fmserve import logs
from fmserve.repository import ModelRepository
from fmserve.service import Service, Servicer, run_until_signalled
from fmserve.v1 import gateway_pb2_grpc
from services.gateway.gateway import Gateway
from services.gateway.pipeline import Pipeline
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Router
from services.gateway.server import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.stages import StageClients

log = logging.getLogger("fmserve.gateway")


def build(settings: GatewaySettings) -> Service:
    """Wire the gateway. Resources stop in reverse: cache, pipeline, then the stage channels."""
    stages = StageClients(settings)
    pipeline = Pipeline(stages, settings)
    cache = ResultCache(stages, settings)
    router = Router(
        ModelRepository(settings.model_repository), settings.max_items, settings.max_text_chars
    )
    gateway = Gateway(router, pipeline, cache, settings.default_timeout_s)
    servicer = Servicer(
        gateway_pb2_grpc.add_GatewayServicer_to_server,
        GatewayServicer(gateway),
        "fmserve.v1.Gateway",
    )
    return Service("gateway", settings, [servicer], resources=[stages, pipeline, cache])


def main() -> None:
    settings = GatewaySettings()
    logs.configure("gateway", settings.log_level, settings.log_format)
    log.info("settings", extra={"settings": settings.model_dump(mode="json")})
    asyncio.run(run_until_signalled(build(settings)))


if __name__ == "__main__":
    main()
