"""Cache service settings (`FMSERVE_CACHE_*`, plus the cluster-wide `FMSERVE_REDIS_URL`)."""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, SecretStr
from pydantic_settings import SettingsConfigDict

from fmserve.core.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    # validate_by_name: tests and tools may pass `redis_url=` beside the env alias.
    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_CACHE_", extra="ignore", validate_by_name=True
    )

    port: int = 50055
    """gRPC port of the cache service."""
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), validation_alias="FMSERVE_REDIS_URL"
    )
    """Redis to keep results in: `redis://[user:password@]host:port/db` (`rediss://` for TLS).
    It may hold a password, so only its host and port ever reach logs and error messages."""
    key_prefix: str = "fmserve:"
    """Prefix of every Redis key this service writes, so several clusters can share one Redis."""
    default_ttl_s: PositiveInt = 3600
    """Time to live of a stored result when the caller asks for none (`ttl_s` = 0)."""
    socket_timeout_s: PositiveFloat = 1.0
    """Longest wait for Redis to connect, to answer one command, or for a free pooled connection
    (redis-py's own default is 5 s: far longer than a cache lookup is worth)."""
    max_connections: PositiveInt = 64
    """Connections to Redis at most; a call beyond them waits up to `socket_timeout_s`."""
    retries: NonNegativeInt = 1
    """Retries of a command after a connection error or timeout. One covers a pooled connection
    that Redis closed while idle; more only delay the miss the gateway falls back to."""
    job_lease_s: PositiveFloat = 30.0
    """How long a job's submission stays alive without its gateway renewing the lease (gateways
    renew every `FMSERVE_GATEWAY_JOB_LEASE_RENEW_S`, which must be well below this); an unsealed
    job whose lease lapses is FAILED."""
    job_max_run_s: PositiveInt = 604_800
    """The deadline of a job that asks for no timeout: past it, the job is EXPIRED (nothing
    stays active, or kept, forever)."""
    job_sweep_interval_s: PositiveFloat = 0.5
    """How often the cache service ends jobs whose lease lapsed or whose deadline passed."""
