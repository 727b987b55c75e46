"""The asynchronous path's metrics: queue traffic (messages) and job items (per stage)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from fmserve.core.metrics import LATENCY_BUCKETS

CONSUMED = Counter(
    "fmserve_queue_messages_consumed_total", "Messages taken from a queue, by stage.", ["stage"]
)
PUBLISHED = Counter(
    "fmserve_queue_messages_published_total",
    "Messages published and confirmed, by destination stage.",
    ["stage"],
)
REDELIVERED = Counter(
    "fmserve_queue_messages_redelivered_total",
    "Messages delivered again after a crash, a dropped connection or a failure, by stage.",
    ["stage"],
)
DEAD_LETTERED = Counter(
    "fmserve_queue_messages_dead_lettered_total",
    "Messages that failed on their last delivery (delivery limit + 1: RabbitMQ dead-letters "
    "them), by stage.",
    ["stage"],
)
OUTCOMES = Counter(
    "fmserve_queue_messages_handled_total",
    "Handled messages by stage and outcome (ack, retry, requeue).",
    ["stage", "outcome"],
)
HANDLE_DURATION = Histogram(
    "fmserve_queue_handle_duration_seconds",
    "Time from taking a message to acking it, by stage.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
DEPTH = Gauge(
    "fmserve_queue_depth_messages",
    "Messages ready in a stage's queues (all priority levels), by stage.",
    ["stage"],
)

ITEMS = Counter(
    "fmserve_job_items_total",
    "Job items leaving a stage, by stage and outcome (forwarded, recorded, failed, dropped, "
    "isolated: re-queued one by one after their chunk failed unexpectedly).",
    ["stage", "outcome"],
)
ITEM_LATENCY = Histogram(
    "fmserve_job_item_latency_seconds",
    "Time from a job item's submission to its answer being recorded, by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


def declare_stage(stage: str) -> None:
    """A consumer's series, at 0 from its start: a series that appears with its first increment
    hides that increment from rate(), and a panel on it shows no data until something happens
    (a first redelivery, a first dead letter)."""
    for counter in (CONSUMED, REDELIVERED, DEAD_LETTERED):
        counter.labels(stage)
    for outcome in ("ack", "retry", "requeue"):
        OUTCOMES.labels(stage, outcome)
    HANDLE_DURATION.labels(stage)
