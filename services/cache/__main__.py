"""`python -m services.cache`: the cache service process."""

from __future__ import annotations

from fmserve.rpc import service
from fmserve.rpc.service import Service
from services.cache import key_server, policy_server
from services.cache.cache import ResultCache
from services.cache.job_store import RedisJobStore
from services.cache.jobs import JobBook
from services.cache.keys import KeyRecords
from services.cache.limits import RateLimitStore
from services.cache.limits_server import limits_servicer
from services.cache.policies import PolicyRecords
from services.cache.server import servicer
from services.cache.settings import CacheSettings
from services.cache.store import RedisStore
from services.cache.sweeper import JobSweeper


def build(settings: CacheSettings) -> Service:
    """The service wired from its settings: Redis store → result cache, job book → servicer,
    the API key records (KeyStore), rate limits (RateLimits), traffic policies
    (TrafficPolicies), and the job sweeper (stopped before Redis closes)."""
    redis = RedisStore(settings)
    cache = ResultCache(redis, settings.default_ttl_s)
    store = RedisJobStore(redis, settings.key_prefix)
    jobs = JobBook(store, settings.job_lease_s, settings.job_max_run_s)
    sweeper = JobSweeper(jobs, settings.job_sweep_interval_s)
    keys = key_server.servicer(KeyRecords(redis, settings.key_prefix))
    limits = limits_servicer(RateLimitStore(redis, settings.key_prefix))
    policies = policy_server.servicer(PolicyRecords(redis, settings.key_prefix))
    servicers = [servicer(cache, jobs), keys, limits, policies]
    return Service("cache", settings, servicers, resources=[redis, sweeper])


def main() -> None:
    service.main(CacheSettings(), build, "cache")


if __name__ == "__main__":
    main()
