"""Job records between the wire (fmserve.v1.Job) and the cache's JobRecord."""

from __future__ import annotations

from fmserve.core.jobs import JobState, state_from_wire, state_to_wire
from fmserve.errors import InvalidInput
from fmserve.v1 import jobs_pb2
from services.cache.job_record import JobRecord


def new_job(job: jobs_pb2.Job) -> JobRecord:
    """What a CreateJob request decides about the new job; the id, state and creation time
    are the job book's to set, the rest starts at 0."""
    return JobRecord(
        id="",
        state=JobState.QUEUED,
        model=job.model,
        version=job.version,
        task=job.task,
        priority=job.priority,
        retention_s=job.retention_s,
        expires_ms=job.expires_unix_ms,
        idempotency_key=job.idempotency_key,
        trace_id=job.trace_id,
        owner_key_id=job.owner_key_id,
    )


def to_wire(record: JobRecord) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=record.id,
        state=state_to_wire(record.state),
        model=record.model,
        version=record.version,
        task=record.task,  # type: ignore[arg-type]
        priority=record.priority,  # type: ignore[arg-type]
        total=record.total,
        sealed=record.sealed,
        done=record.done,
        failed=record.failed,
        created_unix_ms=record.created_ms,
        started_unix_ms=record.started_ms,
        finished_unix_ms=record.finished_ms,
        expires_unix_ms=record.expires_ms,
        retention_s=record.retention_s,
        error=record.error,
        idempotency_key=record.idempotency_key,
        trace_id=record.trace_id,
        owner_key_id=record.owner_key_id,
    )


def state_to_domain(value: int) -> JobState:
    try:
        return state_from_wire(value)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def item_to_domain(item: jobs_pb2.JobItemResult) -> tuple[int, bool, bytes]:
    """(index, answered with a result, the item serialized as it is stored)."""
    return item.index, item.HasField("result"), item.SerializeToString()
