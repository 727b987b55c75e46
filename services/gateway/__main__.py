"""`python -m services.gateway`: run the gateway."""

from __future__ import annotations

from collections.abc import Callable

from fmserve.core.tasks import TaskName
from fmserve.core.watch import RepositoryWatcher
from fmserve.errors import FmserveError
from fmserve.queue.broker import Broker
from fmserve.queue.records import JobRecords
from fmserve.queue.topology import Topology
from fmserve.rpc import service, tls
from fmserve.rpc.service import Resource, Service
from fmserve.rpc.tls import Identity
from services.gateway.access import AccessTable
from services.gateway.admin import FirstAdminKey, KeyAdmin
from services.gateway.auth import AuthInterceptor
from services.gateway.gateway import Gateway
from services.gateway.generator import Generator
from services.gateway.guardian import Guardian
from services.gateway.inference_admin import InferenceAdmin
from services.gateway.jobs import Jobs
from services.gateway.keyring import KeyRing
from services.gateway.keystore import KeyStore
from services.gateway.limits import KeyLimits
from services.gateway.limits_client import LimitsClient
from services.gateway.model_versions import ModelVersions
from services.gateway.outcomes import Outcomes
from services.gateway.pipeline import Pipeline
from services.gateway.policies import PolicyBook
from services.gateway.policy_store import PolicyStore
from services.gateway.result_cache import ResultCache
from services.gateway.rollouts import Rollouts
from services.gateway.routes import Router
from services.gateway.sampling import StopLimits
from services.gateway.server import GatewayServicer, servicer
from services.gateway.settings import GatewaySettings
from services.gateway.shadow import Shadow
from services.gateway.stages import StageClients


def build(settings: GatewaySettings) -> Service:
    """Wire the gateway. Resources stop in reverse: the guardian, rollouts and shadow copies,
    key records, broker, job records, cache, pipeline, the policy book and its store, then the
    stage channels, then the repository's watcher."""
    watcher = RepositoryWatcher.of(settings)
    identity = tls.load(settings)
    stages = StageClients(settings)
    pipeline = Pipeline(stages, settings)
    cache = ResultCache(stages, settings)
    policy_store = PolicyStore(settings.cache_address, identity)
    book = PolicyBook(policy_store, settings.policy_poll_s)
    router = Router(
        watcher.repository,
        settings.max_items,
        settings.max_text_chars,
        book,
    )
    outcomes = Outcomes(book)
    shadow = Shadow(pipeline, outcomes, settings.shadow_max_in_flight, settings.default_timeout_s)
    gateway = Gateway(router, pipeline, cache, settings.default_timeout_s, outcomes, shadow)
    records = JobRecords(settings.cache_address, settings.max_message_bytes, identity)
    broker = _broker(settings) if settings.jobs_enabled else None
    jobs = Jobs(router, broker, records, settings)
    generator = Generator(
        router, stages, cache, StopLimits.of(settings), settings.generate_timeout_s, outcomes
    )
    keys = KeyStore(settings.cache_address, identity)
    admin = KeyAdmin(keys)
    inference = InferenceAdmin(stages)
    rollouts = Rollouts(book, policy_store, inference, router, settings.rollout_ready_timeout_s)
    guardian = Guardian(book, outcomes, rollouts, settings.guard_interval_s)
    resources: list[Resource] = [watcher, stages, policy_store, book, pipeline, cache, records]
    resources += [*([broker] if broker else []), keys, shadow, rollouts, guardian]
    interceptors = []
    if settings.auth:
        limits = _limits(settings, identity)
        resources.append(limits)
        interceptors.append(_auth(settings, keys, router, limits))
        if not settings.admin_key.get_secret_value():
            resources.append(FirstAdminKey(admin))
    versions = ModelVersions(router, inference, book, outcomes)
    public = GatewayServicer(gateway, jobs, admin, generator, rollouts, versions)
    return Service(
        "gateway",
        settings,
        [servicer(public)],
        resources=resources,
        interceptors=interceptors,
        public=True,
    )


def _auth(
    settings: GatewaySettings, keys: KeyStore, router: Router, limits: KeyLimits
) -> AuthInterceptor:
    keyring = KeyRing(keys, settings.key_cache_s, settings.admin_key.get_secret_value())
    table = AccessTable(_task_of(router), _tokens_of(router))
    return AuthInterceptor(keyring, table, limits)


def _limits(settings: GatewaySettings, identity: Identity | None) -> KeyLimits:
    """Per-key limits, kept by the cache service (see limits.py for what fails closed)."""
    client = LimitsClient(
        settings.cache_address, settings.limits_timeout_s, settings.max_message_bytes, identity
    )
    return KeyLimits(client, settings.limits_slot_lease_s, settings.key_model_rpm)


def _task_of(router: Router) -> Callable[[str], str]:
    def task_of(model: str) -> str:
        try:
            return router.repository.get(model).task.value
        except FmserveError:  # unknown or broken: the call will say so, if authorized
            return ""

    return task_of


def _tokens_of(router: Router) -> Callable[[str], tuple[int, int]]:
    def tokens_of(model: str) -> tuple[int, int]:
        try:
            config = router.repository.get(model)
        except FmserveError:  # unknown or broken: the call will say so, if authorized
            return 0, 0
        if config.task is not TaskName.TEXT_GENERATION:
            return 0, 0
        return config.generation.default_max_new_tokens, config.generation.max_new_tokens

    return tokens_of


def _broker(settings: GatewaySettings) -> Broker:
    topology = Topology(settings.amqp_queue_prefix, settings.amqp_delivery_limit)
    url = settings.amqp_url.get_secret_value()
    return Broker(url, topology, settings.publish_timeout_s, "gateway")


def main() -> None:
    service.main(GatewaySettings(), build, "gateway")


if __name__ == "__main__":
    main()
