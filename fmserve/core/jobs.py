"""The job vocabulary: where a job stands (`JobState`), which states can still change, and the
one mapping between the states and the wire's `fmserve.v1.JobState`. It imports nothing but the
standard library and the generated stubs, so the client uses it too."""

from __future__ import annotations

from enum import StrEnum

from fmserve.v1 import jobs_pb2


class JobState(StrEnum):
    """Where a job stands. Each value is also how Redis and the metrics' `state` label spell it;
    the client shows it in lower case ("succeeded")."""

    QUEUED = "QUEUED"
    """Accepted (durable), no item answered yet."""
    RUNNING = "RUNNING"
    """At least one item answered, not all of them."""
    SUCCEEDED = "SUCCEEDED"
    """Every item answered; some may have failed (each says why)."""
    FAILED = "FAILED"
    """The job as a whole failed: every item failed, or the submission broke off."""
    CANCELLED = "CANCELLED"
    """Cancelled by a client; items not answered by then never will be."""
    EXPIRED = "EXPIRED"
    """Not finished by its deadline; the remaining items are dropped."""


ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING})
"""The states a job can leave."""
TERMINAL = frozenset(JobState) - ACTIVE
"""The final states: once a job is in one, it never changes again."""

_TO_WIRE: dict[JobState, jobs_pb2.JobState] = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
    JobState.EXPIRED: jobs_pb2.JOB_STATE_EXPIRED,
}
_FROM_WIRE: dict[int, JobState] = {wire: state for state, wire in _TO_WIRE.items()}


def state_to_wire(state: JobState) -> jobs_pb2.JobState:
    return _TO_WIRE[state]


def state_from_wire(value: int) -> JobState:
    """The state a wire value names. ValueError for JOB_STATE_UNSPECIFIED or a number this
    version does not know: the writer is newer or broken."""
    state = _FROM_WIRE.get(value)
    if state is None:
        raise ValueError(f"unknown job state {value}")
    return state
