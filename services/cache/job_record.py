"""A job's record as the cache service keeps it: typed fields, named as in its Redis hash.
job_store.py reads and writes it in Redis, job_codec.py converts it to and from the wire."""

from __future__ import annotations

from dataclasses import dataclass

from fmserve.core.jobs import JobState


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: JobState
    model: str = ""
    version: str = ""
    task: int = 0
    """The fmserve.v1.Task number: kept and handed back, never read here."""
    priority: int = 0
    """The fmserve.v1.JobPriority number, likewise."""
    total: int = 0
    """Items in the job, known once it is sealed."""
    sealed: bool = False
    done: int = 0
    """Items answered with a result."""
    failed: int = 0
    """Items answered with an error."""
    created_ms: int = 0
    """Unix milliseconds; each time is 0 until it happens."""
    started_ms: int = 0
    finished_ms: int = 0
    expires_ms: int = 0
    """Unix milliseconds after which an unfinished job is EXPIRED; 0: never."""
    retention_s: int = 0
    """How long the record and its results are kept once the job ends."""
    error: str = ""
    idempotency_key: str = ""
    trace_id: str = ""
    owner_key_id: str = ""
    """The id of the API key that submitted the job ('' without auth): never the key."""
