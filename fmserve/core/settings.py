"""The settings every service shares. Each service subclasses `ServiceSettings` with its own
`FMSERVE_<SERVICE>_` prefix; the few cluster-wide values read one unprefixed variable each.
Settings are read here and nowhere else: no other module looks at the environment."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fmserve.core.gguf import DEFAULT_CACHE

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "models"


class TlsSettings(BaseSettings):
    """The certificates of one process of the cluster (cluster-wide variable names; each process
    is given its own files). All three set: the gateway serves TLS, and every other service
    accepts only clients that present a certificate signed by the cluster's CA (mTLS); none set:
    plaintext, as `fmserve up` and the tests run by default. Only paths are held here, so a
    settings dump never carries a private key."""

    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_", extra="ignore", validate_by_name=True, use_attribute_docstrings=True
    )

    tls_cert: Path | None = Field(None, validation_alias="FMSERVE_TLS_CERT")
    """This process's certificate (PEM): its gRPC server presents it, and so does every call it
    makes to another service. `fmserve certs` writes one per service."""
    tls_key: Path | None = Field(None, validation_alias="FMSERVE_TLS_KEY")
    """The private key of `FMSERVE_TLS_CERT` (PEM); only its path is ever logged."""
    tls_ca: Path | None = Field(None, validation_alias="FMSERVE_TLS_CA")
    """The cluster's CA certificate (PEM): services trust only certificates it signed."""

    @model_validator(mode="after")
    def _all_or_none(self) -> TlsSettings:
        given = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(given) and not all(given):
            raise ValueError(
                "TLS needs FMSERVE_TLS_CERT, FMSERVE_TLS_KEY and FMSERVE_TLS_CA together "
                "(`fmserve certs` writes them); set all three, or none for plaintext"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


class ServiceSettings(TlsSettings):
    """Fields common to all five services; subclasses set `env_prefix` and the default port."""

    # validate_by_name: code and tests may pass aliased fields (model_repository, log_level) by
    # their Python names; the environment still uses the aliases. Field docstrings become
    # descriptions, which `fmserve config` prints.
    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_", extra="ignore", validate_by_name=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Interface the gRPC server and /metrics bind. Stages default to loopback, reachable only
    from this machine; compose sets 0.0.0.0 on its internal network."""
    port: int = 0
    """gRPC port; each service has its own default (gateway 50051 … cache 50055)."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off."""
    grace_period_s: float = 10.0
    """On SIGTERM: how long in-flight calls may take to finish before the server exits."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message this service sends, and receives as a client of another service
    (grpcio's 4 MiB default is too small for batches)."""
    max_request_bytes: int = 16 * 1024 * 1024
    """Largest request this service's server accepts, counted after decompression, so a small
    gzip message that inflates past it is refused (RESOURCE_EXHAUSTED) instead of held."""
    max_metadata_bytes: int = 8 * 1024
    """Largest metadata (headers, API key included) a call to this service may carry; a bigger
    one is refused with RESOURCE_EXHAUSTED before any handler runs."""
    max_connection_age_s: float = 30.0
    """Each client connection is closed gracefully (GOAWAY, calls in flight finish) after about
    this long, so clients re-resolve DNS and spread onto replicas added since; 0: never."""
    log_level: str = Field("INFO", validation_alias="FMSERVE_LOG_LEVEL")
    """Log level for every service: DEBUG, INFO, WARNING or ERROR."""
    otlp_endpoint: str = Field("", validation_alias="FMSERVE_OTLP_ENDPOINT")
    """OpenTelemetry collector (OTLP over gRPC, `host:port`) to export traces to; empty: off."""
    log_format: Literal["json", "text"] = Field("json", validation_alias="FMSERVE_LOG_FORMAT")
    """`json`: one JSON object per line; `text`: for reading in a terminal."""


class RepositorySettings(ServiceSettings):
    """Services that read the model repository (preprocess, inference, postprocess, gateway)."""

    model_repository: Path = Field(DEFAULT_REPOSITORY, validation_alias="FMSERVE_MODEL_REPOSITORY")
    """Folder with one sub-folder per model (see README, "Model repository")."""
    converted_cache: Path = Field(DEFAULT_CACHE, validation_alias="FMSERVE_CONVERTED_CACHE")
    """Folder where GGUF models are converted, once per machine, to safetensors; every service
    of a machine must agree on it."""
    repository_poll_s: PositiveFloat = Field(2.0, validation_alias="FMSERVE_REPOSITORY_POLL_S")
    """How often the model repository is reread: a new model or version folder, a removed one,
    or an edited model.toml is seen within this long. Requests read the configs from memory."""


class ClientSettings(BaseSettings):
    """What the `fmserve` CLI reads: where the gateway is, and for `fmserve up`, Redis."""

    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_", extra="ignore", use_attribute_docstrings=True
    )

    address: str = "localhost:50051"
    """Gateway address the CLI talks to."""
    certs: Path | None = None
    """A folder written by `fmserve certs`: `fmserve up` gives each service its certificate
    from it (TLS at the gateway, mTLS between services), and the CLI trusts its `ca.crt`."""
    tls_ca: Path | None = None
    """CA certificate (PEM) the CLI verifies the gateway's certificate with: TLS on."""
    tls: bool = False
    """TLS to the gateway, trusting the system's root certificates (a gateway whose certificate
    a public CA signed); implied by `FMSERVE_TLS_CA` or `FMSERVE_CERTS`."""
    api_key: SecretStr = SecretStr("")
    """The API key the CLI sends (`authorization: Bearer <key>`) to a cluster with auth on."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis used by the cache service; `fmserve up` checks it is reachable first."""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ used by the asynchronous path; `fmserve up` checks it is reachable first."""
    inference_preload: str = "minilm-embed,minilm-sentiment"
    """Models `fmserve up` has the inference service load, and preprocess load their
    tokenizers, before it says ready."""


def variables(
    settings_class: type[BaseSettings], skip: type[BaseSettings] | None = None
) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) per field of a settings class; fields that
    `skip` declares too are left out unless the class changes their default."""
    prefix = settings_class.model_config.get("env_prefix", "")
    inherited = skip.model_fields if skip else {}
    rows = []
    for name, field in settings_class.model_fields.items():
        if name in inherited and inherited[name].default == field.default:
            continue
        alias = field.validation_alias
        env = alias if isinstance(alias, str) else f"{prefix}{name}".upper()
        default = field.default
        shown = default.get_secret_value() if hasattr(default, "get_secret_value") else default
        rows.append((env, str(shown), " ".join((field.description or "").split())))
    return rows


class PreloadSettings(BaseSettings):
    """Services that load something per model (inference: the model; preprocess: its
    tokenizer), so the first request after SERVING does not pay for the load."""

    preload: str = ""
    """Comma-separated model names loaded (default version) and warmed up at start, before the
    service reports SERVING; empty loads each model on first use."""

    @property
    def preload_models(self) -> list[str]:
        return [name.strip() for name in self.preload.split(",") if name.strip()]


class AmqpSettings(BaseSettings):
    """Services that use RabbitMQ (the gateway publishes jobs; the stages consume them). The
    broker and the queue names are cluster-wide; the publish timeout is per service."""

    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_", extra="ignore", validate_by_name=True, use_attribute_docstrings=True
    )

    amqp_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672/"), validation_alias="FMSERVE_AMQP_URL"
    )
    """RabbitMQ for the asynchronous path: `amqp://user:password@host:port/vhost`. Only its
    host and port reach logs and error messages."""
    amqp_queue_prefix: str = Field("fmserve.", validation_alias="FMSERVE_AMQP_QUEUE_PREFIX")
    """Prefix of every queue and exchange name, so several clusters (or test runs) can share one
    RabbitMQ."""
    amqp_delivery_limit: PositiveInt = Field(5, validation_alias="FMSERVE_AMQP_DELIVERY_LIMIT")
    """Redeliveries of a failing message (the queues' x-delivery-limit): it is delivered this
    many times + 1, then dead-lettered and its items marked failed. Fixed when a queue is first
    declared: every service must agree on it (a service that does not logs an ERROR)."""
    publish_timeout_s: PositiveFloat = 10.0
    """Longest wait for RabbitMQ to confirm a publish, reconnection included, before the
    caller is told UNAVAILABLE."""


class AuthSettings(BaseSettings):
    """API keys at the gateway (cluster-wide: every gateway replica must agree)."""

    model_config = SettingsConfigDict(
        env_prefix="FMSERVE_", extra="ignore", validate_by_name=True, use_attribute_docstrings=True
    )

    auth: bool = Field(False, validation_alias="FMSERVE_AUTH")
    """Require an API key (`authorization: Bearer <key>`) on every public RPC (`on`/`off`). Off
    by default for local development; compose and Kubernetes turn it on."""
    admin_key: SecretStr = Field(SecretStr(""), validation_alias="FMSERVE_ADMIN_KEY")
    """A first admin key (`fmserve keys generate` makes one), accepted by every gateway without
    being stored. Empty with auth on: the first gateway to start creates an admin key named
    `admin` and logs it once."""


class WorkerSettings(AmqpSettings):
    """Stage services (preprocess, inference, postprocess): their queue consumer."""

    worker_enabled: bool = True
    """Consume this stage's job queues; false serves the synchronous path only (no RabbitMQ)."""
    cache_address: str = "127.0.0.1:50055"
    """Cache service, where job states are read and answered items recorded; same address
    forms as the gateway's."""
    worker_prefetch: PositiveInt = 4
    """Unacknowledged messages per priority queue at once. Modest, because a crash counts a
    delivery against every message it held (quorum queues)."""
    worker_concurrency: PositiveInt = 2
    """Chunks a stage works on at once, highest priority first."""
    worker_transient_hold_s: PositiveFloat = 30.0
    """How long a stage holds a message through transient errors (a store or broker down, a
    model not ready, a full batcher), retrying it with backoff without spending a delivery;
    after that it goes back to its queue and spends one, so an error that never passes (a model
    whose files are broken) ends in the dead-letter queue instead of looping forever."""
    job_state_ttl_s: PositiveFloat = 1.0
    """How long a stage trusts a job's state before asking the cache service again, and how
    often a running chunk checks it; bounds how long a cancelled or expired job's items are
    still processed (a generation job's running sequences included)."""


# Each service registers its settings class under this entry point group (pyproject.toml), so
# the shared core learns which services exist without naming their modules.
SERVICES_GROUP = "fmserve.services"


def _registered(service: str) -> EntryPoint:
    found = {ep.name: ep for ep in entry_points(group=SERVICES_GROUP)}
    if service not in found:
        raise LookupError(
            f"no service {service!r} is registered under the {SERVICES_GROUP!r} entry points; "
            "reinstall fmserve (`make install`)"
        )
    return found[service]


def settings_class(service: str) -> type[ServiceSettings]:
    """A registered service's settings class."""
    cls: type[ServiceSettings] = _registered(service).load()
    return cls


def service_module(service: str) -> str:
    """The module `python -m` runs for a registered service: the package of its settings."""
    return _registered(service).module.rsplit(".", 1)[0]
