"""Job records between the wire (fmserve.v1.Job) and the field dicts Redis holds."""

from __future__ import annotations

from fmserve.v1 import jobs_pb2

# Wire field → Redis field, for the integers kept under a different name.
_TIMES = {
    "created_unix_ms": "created_ms",
    "started_unix_ms": "started_ms",
    "finished_unix_ms": "finished_ms",
    "expires_unix_ms": "expires_ms",
}


def new_job_fields(job: jobs_pb2.Job) -> dict[str, str]:
    """What a CreateJob request decides about the new job (the rest is the cache's to set)."""
    return {
        "model": job.model,
        "version": job.version,
        "task": str(job.task),
        "priority": str(job.priority),
        "retention_s": str(job.retention_s),
        "expires_ms": str(job.expires_unix_ms),
        "trace_id": job.trace_id,
    }


def to_wire(record: dict[str, str]) -> jobs_pb2.Job:
    def number(name: str) -> int:
        return int(record.get(name) or 0)

    return jobs_pb2.Job(
        id=record["id"],
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{record['state']}"),
        model=record.get("model", ""),
        version=record.get("version", ""),
        task=number("task"),  # type: ignore[arg-type]
        priority=number("priority"),  # type: ignore[arg-type]
        total=number("total"),
        sealed=record.get("sealed") == "1",
        done=number("done"),
        failed=number("failed"),
        retention_s=number("retention_s"),
        error=record.get("error", ""),
        idempotency_key=record.get("idempotency_key", ""),
        trace_id=record.get("trace_id", ""),
        **{wire: number(field) for wire, field in _TIMES.items()},
    )


def state_name(state: int) -> str:
    """JOB_STATE_CANCELLED → "CANCELLED"."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def item_to_domain(item: jobs_pb2.JobItemResult) -> tuple[int, bool, bytes]:
    """(index, answered with a result, the item serialized as it is stored)."""
    return item.index, item.HasField("result"), item.SerializeToString()
