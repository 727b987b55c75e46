"""The job book's rules: ids, which requests are accepted, the lifecycle (deadlines, submission
leases and the sweep that ends jobs on time, see job_store.py), and what is counted. Records
are JobRecords here (job_store.py keeps them); the servicer converts them to the wire."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import replace

from fmserve.core.jobs import ACTIVE, JobState
from fmserve.errors import Conflict, InvalidInput, JobNotFound
from services.cache.job_record import JobRecord
from services.cache.job_store import CREATED, LAPSED_NOW, LATE, STREAMING, RedisJobStore
from services.cache.metrics import ITEMS, JOBS

# The states a FinishJob may set; the others are reached by recording items.
FINISHABLE = (JobState.CANCELLED, JobState.FAILED, JobState.EXPIRED)
MAX_PAGE = 10_000
DEFAULT_PAGE = 1000
MAX_LIST = 1000
MAX_KEY_CHARS = 200
# Kept past a job's deadline and retention before its keys go: the sweep's delay, a slow clock.
TTL_MARGIN_MS = 60_000


def now_ms() -> int:
    return int(time.time() * 1000)


class JobBook:
    """Creates, reads, advances and finishes jobs; answers NOT_FOUND for unknown ids."""

    def __init__(
        self, store: RedisJobStore, lease_s: float = 30.0, max_run_s: int = 604_800
    ) -> None:
        self.store = store
        self.lease_ms = int(lease_s * 1000)
        self.max_run_ms = max_run_s * 1000
        for state in JobState:  # every state's series at 0 from the start
            JOBS.labels(state)

    async def create(self, request: JobRecord) -> tuple[JobRecord, bool]:
        """A new job as `request` describes it (model, version, task, priority, retention,
        expiry, trace and idempotency key; id, state and creation time are set here), or the
        job its idempotency key already names. A job gets a deadline (`max_run_s` when it asks
        for none) and its submission a lease; Conflict while the key's first submission is
        still streaming (its items and a second submission's must not mix)."""
        if len(request.idempotency_key) > MAX_KEY_CHARS:
            raise InvalidInput(f"idempotency_key is longer than {MAX_KEY_CHARS} characters")
        if request.retention_s <= 0:
            raise InvalidInput("retention_s must be a positive number of seconds")
        now = now_ms()
        latest = now + self.max_run_ms
        expires = min(request.expires_ms, latest) if request.expires_ms > 0 else latest
        # 128 random bits from `secrets`: a job id cannot be guessed (job ownership relies on it).
        record = replace(
            request,
            id=secrets.token_hex(16),
            state=JobState.QUEUED,
            created_ms=now,
            expires_ms=expires,
        )
        ttl_ms = max(expires - now, 0) + request.retention_s * 1000 + TTL_MARGIN_MS
        found, outcome = await self.store.create(record, ttl_ms, now + self.lease_ms)
        if outcome == STREAMING:
            raise Conflict(
                f"a submission with this idempotency key is still in progress (job {found}); "
                "wait for it to be accepted, then submit again to get that job"
            )
        if outcome == CREATED:
            JOBS.labels(JobState.QUEUED).inc()
        return await self.get(found), outcome == CREATED

    async def get(self, job_id: str) -> JobRecord:
        """The record; a job past its deadline is EXPIRED first (here, where every reader and
        every stage looks, so no timer is needed)."""
        record = await self._read(job_id)
        if record.state in ACTIVE and record.expires_ms and now_ms() > record.expires_ms:
            await self._finish(job_id, JobState.EXPIRED, LATE)
            record = await self._read(job_id)
        return record

    async def renew(self, job_id: str) -> JobRecord:
        """Extend an unsealed job's submission lease (its gateway is still streaming); a job
        that ended or was sealed is returned as it is, one whose lease lapsed is FAILED now."""
        outcome = await self.store.renew(job_id, now_ms(), now_ms() + self.lease_ms)
        if outcome < 0:
            raise JobNotFound.unknown(job_id)
        if outcome == LAPSED_NOW:
            JOBS.labels(JobState.FAILED).inc()
        return await self._read(job_id)

    async def sweep(self) -> tuple[int, int]:
        """End the jobs that are due: unsealed ones whose lease lapsed FAILED, overdue ones
        EXPIRED. Returns how many of each."""
        failed, expired = await self.store.sweep(now_ms())
        JOBS.labels(JobState.FAILED).inc(failed)
        JOBS.labels(JobState.EXPIRED).inc(expired)
        return failed, expired

    async def seal(self, job_id: str, total: int) -> JobRecord:
        if total <= 0:
            raise InvalidInput(f"total is {total}; a job has at least one item")
        found, completed = await self.store.seal(job_id, total, now_ms())
        if not found:
            raise JobNotFound.unknown(job_id)
        if completed:
            JOBS.labels(completed).inc()
        return await self._read(job_id)

    async def record(
        self, job_id: str, items: Sequence[tuple[int, bool, bytes]]
    ) -> tuple[JobRecord, int]:
        """Record answered items (index, ok, serialized JobItemResult); returns the record and
        how many were new. Duplicates and items of a terminal job are not recorded."""
        for index, _, _ in items:
            if index < 0:
                raise InvalidInput(f"item index {index} is negative")
        recorded, completed, started = await self.store.record(job_id, items, now_ms())
        if recorded < 0:
            raise JobNotFound.unknown(job_id)
        if started:
            JOBS.labels(JobState.RUNNING).inc()
        if completed:
            JOBS.labels(completed).inc()
        ITEMS.labels("recorded").inc(recorded)
        ITEMS.labels("not recorded").inc(len(items) - recorded)
        return await self._read(job_id), recorded

    async def finish(self, job_id: str, state: JobState, error: str) -> JobRecord:
        if state not in FINISHABLE:
            raise InvalidInput(f"a job can be finished as {', '.join(FINISHABLE)}, not {state}")
        if not await self._finish(job_id, state, error):
            record = await self._read(job_id)
            raise Conflict(
                f"job {job_id} has already ended ({record.state}); it cannot become {state}"
            )
        return await self._read(job_id)

    async def results(self, job_id: str, start: int, limit: int) -> tuple[JobRecord, list[bytes]]:
        if start < 0:
            raise InvalidInput(f"start is {start}; pages start at item 0 or later")
        if limit < 0 or limit > MAX_PAGE:
            raise InvalidInput(f"limit must lie between 0 (the default) and {MAX_PAGE}")
        record = await self.get(job_id)
        return record, await self.store.results(job_id, start, limit or DEFAULT_PAGE)

    async def recent(self, limit: int, owner_key_id: str = "") -> list[JobRecord]:
        if limit < 0 or limit > MAX_LIST:
            raise InvalidInput(f"limit must lie between 0 (the default, 50) and {MAX_LIST}")
        return await self.store.recent(limit or 50, owner_key_id)

    async def _finish(self, job_id: str, state: JobState, error: str) -> bool:
        outcome = await self.store.finish(job_id, state, error, now_ms())
        if outcome < 0:
            raise JobNotFound.unknown(job_id)
        if outcome:
            JOBS.labels(state).inc()
        return bool(outcome)

    async def _read(self, job_id: str) -> JobRecord:
        if not job_id:
            raise InvalidInput("job_id is required")
        record = await self.store.get(job_id)
        if record is None:
            raise JobNotFound.unknown(job_id)
        return record
