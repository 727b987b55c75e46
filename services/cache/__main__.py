"""`python -m services.cache`: the cache service process."""

from __future__ import annotations

from fmserve.rpc import service
from fmserve.rpc.service import Service
from services.cache.cache import ResultCache
from services.cache.job_store import RedisJobStore
from services.cache.jobs import JobBook
from services.cache.server import servicer
from services.cache.settings import CacheSettings
from services.cache.store import RedisStore


def build(settings: CacheSettings) -> Service:
    """The service wired from its settings: Redis store → result cache, job book → servicer."""
    redis = RedisStore(settings)
    cache = ResultCache(redis, settings.default_ttl_s)
    jobs = JobBook(RedisJobStore(redis, settings.key_prefix))
    return Service("cache", settings, [servicer(cache, jobs)], resources=[redis])


def main() -> None:
    service.main(CacheSettings(), build, "cache")


if __name__ == "__main__":
    main()
