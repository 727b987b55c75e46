"""Gateway settings (`FMSERVE_GATEWAY_*`)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fmserve.core.settings import AmqpSettings, AuthSettings, RepositorySettings


class GatewaySettings(RepositorySettings, AmqpSettings, AuthSettings):
    model_config = SettingsConfigDict(env_prefix="FMSERVE_GATEWAY_", extra="ignore")

    host: str = "0.0.0.0"
    """Interface the gateway binds: every one, as the cluster's public front door."""
    port: int = 50051
    """gRPC port of the gateway: the cluster's public API."""
    preprocess_address: str = "127.0.0.1:50052"
    """Preprocess service: `host:port` (DNS, every address used) or `ip:port,ip:port`."""
    inference_address: str = "127.0.0.1:50053"
    """Inference service, or any KServe v2 endpoint such as a Triton server; same forms."""
    postprocess_address: str = "127.0.0.1:50054"
    """Postprocess service; same forms."""
    cache_address: str = "127.0.0.1:50055"
    """Cache service; same forms."""
    max_items: int = 1024
    """Most texts in one Infer request."""
    max_text_chars: int = 100_000
    """Longest text accepted, in characters (token limits are the model's, checked later)."""
    default_timeout_s: float = 30.0
    """Deadline for a request whose client sent none."""
    cache_timeout_s: float = 0.25
    """A cache lookup slower than this counts as a miss: the cache never holds up an answer."""
    cache_ttl_s: int = 0
    """Time to live of stored results; 0 uses the cache service's default."""
    near_cache_entries: int = Field(4096, ge=0)
    """Results this gateway keeps in its own memory, the most recently used, so that a repeat
    is answered without a call to the cache service (a cache hit's p50 0.9 ms against 2.4-2.9,
    2.0-2.4x the hits per second at concurrency 32; bench/); 0: none."""
    near_cache_ttl_s: float = Field(5.0, gt=0)
    """How long a result stays in the gateway's memory. A result is the same whenever it is
    computed (its key names the model version, options and input), so this bounds only how long
    a copy may outlive the cache service's."""
    limits_timeout_s: float = 2.0
    """Longest wait for the cache service to check an API key's limits; a call whose limits
    cannot be checked in time is refused UNAVAILABLE (limits fail closed). A cache service
    that is down answers at once; this bounds one that is overloaded or hung."""
    limits_slot_lease_s: float = 30.0
    """How long a concurrency slot outlives a gateway that stopped renewing it (a crash); a
    running call's slot is renewed every third of this, so it is held as long as the call."""
    key_model_rpm: int = 0
    """Requests per minute one API key may send to any one model (a token bucket per key and
    model, burst as many), on top of the key's own rpm; 0: no per-model limit."""
    max_batch_size: int = 64
    """Most texts the gateway sends downstream in one call per stage."""
    max_media_batch_bytes: int = 12 * 1024 * 1024
    """Most bytes of media in one downstream call, featurized (FP32 pixels or samples: 20
    images of 224x224) and as encoded (the Featurize request carries the bytes as sent); one
    bigger item goes alone. Keep it under the stages' FMSERVE_*_MAX_REQUEST_BYTES (16 MiB by
    default)."""
    max_batches_in_flight: int = 2
    """Concurrent downstream batches per model; more requests wait and join the next batch.
    Fewer, larger batches pay fewer hops: on one 2-core machine with one inference replica, 2
    served 8-9% more at concurrency 32 than 4, and 4 more than 8 (bench/). A gateway keeps at
    most this many inference replicas busy per model: raise it when inference scales out
    (Kubernetes sets 4)."""
    stage_streams: int = 4
    """Streams the gateway keeps open to each stage service, its calls to the stage taken in
    turn as messages on them (fmserve.v1.Tunnel: about half a unary call's cost). A stream stays
    on the replica it opened on: keep this at least the replicas of the most scaled stage.
    0: plain unary calls."""
    stage_stream_age_s: float = 30.0
    """How long a stream to a stage carries new calls before a new one replaces it, which the
    channel's round robin may open on another replica: replicas added since get their share
    within this."""
    max_queue_size: int = 10_000
    """Texts waiting per model before requests are refused with RESOURCE_EXHAUSTED."""
    jobs_enabled: bool = True
    """Accept batch jobs (SubmitJob); false for a cluster without RabbitMQ: SubmitJob then
    answers UNAVAILABLE saying so, and jobs submitted before can still be read."""
    job_chunk_size: int = 32
    """Items per queue message of a job: one inference batch, so a chunk is one forward pass."""
    max_job_chunk_bytes: int = 8 * 1024 * 1024
    """Most encoded media bytes (images, audio clips) in one queue message of a media job, well
    under RabbitMQ's largest message (128 MiB by default), which also carries the featurized
    inputs (up to `max_media_batch_bytes`). A job with an item over it is refused
    (INVALID_ARGUMENT naming the item)."""
    job_max_items: int = 1_000_000
    """Most items in one job; a bigger submission is refused with RESOURCE_EXHAUSTED."""
    job_retention_s: int = 86_400
    """How long a finished job and its results are kept when the submission asks for no
    particular time."""
    job_lease_renew_s: float = 5.0
    """How often a submission renews its job's lease while its stream is open; keep it well
    below the cache service's `FMSERVE_CACHE_JOB_LEASE_S`, past which an unrenewed job FAILS."""
    job_publish_window: int = 64
    """Chunks of a submission whose publish confirms may be outstanding at once (the stream
    waits beyond that, so memory stays bounded while confirms arrive as they will)."""
    job_queue_max_messages: int = 100_000
    """Chunks (of `job_chunk_size` items) that may wait in the preprocess queues; beyond that
    SubmitJob is refused with RESOURCE_EXHAUSTED ("retry later"), at its start and while it
    streams, so a backlog never fills RabbitMQ's disk. 0 turns the bound off."""
    job_queue_depth_cache_s: float = 1.0
    """How long one reading of the preprocess queues' depth serves every submission."""
    job_watch_interval_s: float = 0.25
    """How often WatchJob looks for a change of a job's state or progress (one read per
    watched job, however many watch it)."""
    max_watchers: int = 1000
    """WatchJob streams open at once; more are refused with RESOURCE_EXHAUSTED. 0: no bound."""
    max_watchers_per_connection: int = 100
    """WatchJob streams open at once on one client connection; 0: no bound."""
    key_cache_s: float = 0.5
    """How long a gateway trusts an API key it verified before asking the cache service again:
    a revoked key stops working within this time on every replica."""
    max_stop_strings: int = 16
    """Most stop strings in one Generate request."""
    max_stop_chars: int = 256
    """Longest stop string, in characters."""
    policy_poll_s: float = 0.25
    """How often the gateway asks the cache service whether a traffic policy changed (one small
    call; the policies are read again only when one did): a change made on any replica is in
    force on every replica within this plus a round trip."""
    rollout_ready_timeout_s: float = 300.0
    """Longest a SetTrafficPolicy (`fmserve rollout`) waits for its versions to load and warm
    up on the inference service before it reports the rollout FAILED."""
    guard_interval_s: float = 0.5
    """How often each guarded canary's recent requests are judged against its guard."""
    shadow_max_in_flight: int = 64
    """Copies of requests for a shadow version running at once; more are dropped (and
    counted), so a slow shadow version never holds up the others."""
    generate_timeout_s: float = 300.0
    """Deadline for a Generate stream whose client sent none (generation takes longer than
    an Infer call)."""
