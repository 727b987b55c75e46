"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

from fmserve.core.repository import ModelRepository
from fmserve.queue.broker import Broker
from fmserve.queue.records import JobRecords
from fmserve.queue.topology import Topology
from fmserve.rpc import service
from fmserve.rpc.service import Resource, Service
from services.gateway.gateway import Gateway
from services.gateway.generator import Generator
from services.gateway.jobs import Jobs
from services.gateway.pipeline import Pipeline
from services.gateway.result_cache import ResultCache
from services.gateway.routes import Router
from services.gateway.sampling import StopLimits
from services.gateway.server import servicer
from services.gateway.settings import GatewaySettings
from services.gateway.stages import StageClients


def build(settings: GatewaySettings) -> Service:
    """Wire the gateway. Resources stop in reverse: broker, job records, cache, pipeline,
    then the stage channels."""
    stages = StageClients(settings)
    pipeline = Pipeline(stages, settings)
    cache = ResultCache(stages, settings)
    router = Router(
        ModelRepository(settings.model_repository, settings.converted_cache),
        settings.max_items,
        settings.max_text_chars,
    )
    gateway = Gateway(router, pipeline, cache, settings.default_timeout_s)
    records = JobRecords(settings.cache_address, settings.max_message_bytes)
    broker = _broker(settings) if settings.jobs_enabled else None
    jobs = Jobs(router, broker, records, settings)
    limits = StopLimits(settings.max_stop_strings, settings.max_stop_chars)
    generator = Generator(router, stages, cache, limits, settings.generate_timeout_s)
    resources: list[Resource] = [stages, pipeline, cache, records, *([broker] if broker else [])]
    servicers = [servicer(gateway, jobs, generator)]
    return Service("gateway", settings, servicers, resources=resources)


def _broker(settings: GatewaySettings) -> Broker:
    topology = Topology(settings.amqp_queue_prefix, settings.amqp_delivery_limit)
    url = settings.amqp_url.get_secret_value()
    return Broker(url, topology, settings.publish_timeout_s, "gateway")


def main() -> None:
    service.main(GatewaySettings(), build, "gateway")


if __name__ == "__main__":
    main()
