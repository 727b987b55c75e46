"""Job records in Redis: every change that must be atomic is one Lua script, so concurrent
stages, gateways and cache replicas never see or make a half-done change.

    {prefix}job:{id}          hash    the record: one field per JobRecord field (job_record.py),
                                      plus idempotency_redis_key, the name of the key below,
                                      and lease_until_ms (the submission lease, see below)
    {prefix}job:{id}:results  hash    item index → serialized fmserve.v1.JobItemResult
    {prefix}job:key:{key}     string  idempotency key → job id ({prefix}job:key:{owner}:{key}
                                      for a job with an owner: one key's idempotency key never
                                      names another key's job)
    {prefix}job:index         zset    job id by creation time (ListJobs), newest INDEX_SIZE kept
    {prefix}job:owner:{key}   zset    the same for one API key id's jobs (its ListJobs), with the
                                      TTL of its newest job
    {prefix}job:leases        zset    unsealed active job id by its submission lease's end (ms)
    {prefix}job:deadlines     zset    active job id by its deadline, expires_ms

The lifecycle, so that no job stays active or kept forever, whoever dies:
- Every job has a deadline (expires_ms; the job book gives one to a job that asked for none)
  and its keys carry a TTL from creation: the deadline plus its retention plus a margin. When
  the job ends, its keys' TTL becomes its retention.
- An unsealed job holds a submission lease (lease_until_ms) that the submitting gateway renews
  while its stream is open. A job whose lease lapses before it is sealed is FAILED: its
  submission stopped, whether the client, the gateway or the link to the cache died.
- The sweep (one script, run every fraction of a second by every cache replica: it is atomic
  and idempotent, so replicas need no coordination) ends the jobs due in the two sorted sets:
  lapsed leases FAILED, passed deadlines EXPIRED. Reads also expire a job that is overdue, and
  recording or sealing a job past its deadline expires it instead of completing it.
A TTL makes a key evictable under a `volatile-*` policy: store.py says why `volatile-ttl` takes
cache entries first.

Rules the scripts hold: recording an item is HSETNX (a redelivered item never counts twice, and
the counters move only for new items); the item that completes a sealed job sets its terminal
state in the same script; a terminal state is never changed; items of a terminal job are ignored.
A second creation with the idempotency key of an unsealed job whose lease holds is refused
(the first submission is still streaming: joining it would mix two submissions' items).
The scripts touch the idempotency key and swept jobs through names they build or read (a single
Redis instance allows it; Redis Cluster would need hash tags). Every script's KEYS start with
the leases and deadlines sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, cast

from fmserve.core.jobs import ACTIVE, JobState
from services.cache.job_record import JobRecord
from services.cache.store import RedisStore

INDEX_SIZE = 10_000
SWEEP_LIMIT = 1000
"""Most jobs one sweep ends per set: one script call stays short; the next sweep goes on."""
CREATED, KEPT, STREAMING = 1, 0, 2
"""What creating with an idempotency key found: nothing (a new job), a job that stays the
key's answer, or a job whose submission is still streaming."""

LAPSED_NOW = 2
"""A renewal found the lease lapsed and FAILED the job."""

LAPSED = (
    "the submission stopped before it was complete (the client, the gateway or its link to "
    "the job records went away); submit the job again"
)
LATE = "the job did not finish before its timeout"


def _lua_states() -> str:
    """Every state as a Lua local named like it (`local QUEUED = 'QUEUED'`) and `active(state)`,
    built from JobState: the scripts name states only through these, so they cannot drift from
    the enum (and Redis refuses a misspelt name, an undeclared global, when the script runs)."""
    declared = [f"local {state.name} = '{state.value}'" for state in JobState]
    active = " or ".join(f"state == {state.name}" for state in JobState if state in ACTIVE)
    return "\n".join([*declared, f"local function active(state) return {active} end"])


# Shared by the scripts: complete a sealed job whose items are all answered, finish a job
# (terminal state, timings, retention TTLs, out of the sweep's sets), and expire it when due.
_PRELUDE = (
    _lua_states()
    + """
local leases, deadlines = KEYS[1], KEYS[2]
local function finish(job, results, state, err, now)
  local id = redis.call('HGET', job, 'id')
  redis.call('ZREM', leases, id)
  redis.call('ZREM', deadlines, id)
  redis.call('HSET', job, 'state', state, 'finished_ms', now)
  if err ~= '' then redis.call('HSET', job, 'error', err) end
  local ttl = tonumber(redis.call('HGET', job, 'retention_s'))
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', results, ttl)
  local key = redis.call('HGET', job, 'idempotency_redis_key')
  if key and key ~= '' then redis.call('EXPIRE', key, ttl) end
end
local function complete(job, results, now)
  local f = redis.call('HMGET', job, 'sealed', 'total', 'done', 'failed')
  if f[1] ~= '1' then return '' end
  local total, done, failed = tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
  if done + failed < total then return '' end
  if failed == total then
    finish(job, results, FAILED, 'every item failed; each item says why', now)
    return FAILED
  end
  finish(job, results, SUCCEEDED, '', now)
  return SUCCEEDED
end
local function overdue(job, now)
  local expires = tonumber(redis.call('HGET', job, 'expires_ms') or '0') or 0
  return expires > 0 and tonumber(now) > expires
end
"""
)

# KEYS: leases, deadlines, idempotency key ('' for none), job, index, owner's index ('' for
# none). ARGV: id, now, job key
# prefix, how many jobs the index keeps, TTL (ms), lease end (ms), deadline (ms), what a lapsed
# submission's job says, then field/value pairs.
# Returns {id, 1} for the new job; {id, 0} for the job the key names when it is still kept (and
# was not a submission that broke off: FAILED before it was sealed); {id, 2} when that job's
# submission is still streaming (unsealed, its lease holds). A lapsed one is FAILED here.
_CREATE = """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local job = ARGV[3] .. existing
    local f = redis.call('HMGET', job, 'state', 'sealed', 'lease_until_ms')
    if f[1] and active(f[1]) and f[2] ~= '1' then
      if tonumber(f[3] or '0') > tonumber(ARGV[2]) then return {existing, 2} end
      finish(job, job .. ':results', FAILED, ARGV[8], ARGV[2])
      f[1] = FAILED
    end
    if f[1] and not (f[1] == FAILED and f[2] ~= '1') then return {existing, 0} end
  end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('HSET', KEYS[4], 'lease_until_ms', ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('ZADD', leases, ARGV[6], ARGV[1])
if tonumber(ARGV[7]) > 0 then redis.call('ZADD', deadlines, ARGV[7], ARGV[1]) end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -(tonumber(ARGV[4]) + 1))
if KEYS[6] ~= '' then
  redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(tonumber(ARGV[4]) + 1))
  redis.call('PEXPIRE', KEYS[6], ARGV[5])
end
return {ARGV[1], 1}
"""

# KEYS: leases, deadlines, job, results. ARGV: total, now, what an overdue job says.
# Returns {-1} unknown, else {1, the terminal state this call ended the job with, or ''}.
_SEAL = """
local job, results = KEYS[3], KEYS[4]
local state = redis.call('HGET', job, 'state')
if not state then return {-1, ''} end
if not active(state) or redis.call('HGET', job, 'sealed') == '1' then return {1, ''} end
if overdue(job, ARGV[2]) then
  finish(job, results, EXPIRED, ARGV[3], ARGV[2])
  return {1, EXPIRED}
end
redis.call('HSET', job, 'sealed', '1', 'total', ARGV[1])
redis.call('ZREM', leases, redis.call('HGET', job, 'id'))
return {1, complete(job, results, ARGV[2])}
"""

# KEYS: leases, deadlines, job, results. ARGV: now, what an overdue job says, then (index, ok,
# payload) triples. Returns {-1} for an unknown job, else {items recorded now, the terminal
# state this call ended it with or '', 1 if this call started it (QUEUED → RUNNING) else 0}.
# A job past its deadline records nothing: it is EXPIRED, never completed late.
_RECORD = """
local job, results = KEYS[3], KEYS[4]
local state = redis.call('HGET', job, 'state')
if not state then return {-1, '', 0} end
if not active(state) then return {0, '', 0} end
if overdue(job, ARGV[1]) then
  finish(job, results, EXPIRED, ARGV[2], ARGV[1])
  return {0, EXPIRED, 0}
end
local done, failed = 0, 0
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', results, ARGV[i], ARGV[i + 2]) == 1 then
    if ARGV[i + 1] == '1' then done = done + 1 else failed = failed + 1 end
  end
end
if done > 0 then redis.call('HINCRBY', job, 'done', done) end
if failed > 0 then redis.call('HINCRBY', job, 'failed', failed) end
local ttl = redis.call('PTTL', job)  -- the record's TTL from creation (none if older)
if done + failed > 0 and ttl > 0 and redis.call('PTTL', results) == -1 then
  redis.call('PEXPIRE', results, ttl)
end
local started = 0
if state == QUEUED and done + failed > 0 then
  redis.call('HSET', job, 'state', RUNNING, 'started_ms', ARGV[1])
  started = 1
end
return {done + failed, complete(job, results, ARGV[1]), started}
"""

# KEYS: leases, deadlines, job, results. ARGV: state, error, now. Returns -1 unknown,
# 0 already terminal, 1 done.
_FINISH = """
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return -1 end
if not active(state) then return 0 end
finish(KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3])
return 1
"""

# KEYS: leases, deadlines, job. ARGV: now, new lease end, what a lapsed submission's job says.
# Returns -1 unknown, 0 the job no longer takes items (ended or sealed), 1 renewed, 2 its lease
# had lapsed: it is FAILED now.
_RENEW = """
local job = KEYS[3]
local f = redis.call('HMGET', job, 'state', 'sealed', 'lease_until_ms', 'id')
if not f[1] then return -1 end
if not active(f[1]) or f[2] == '1' then return 0 end
if tonumber(f[3] or '0') < tonumber(ARGV[1]) then
  finish(job, job .. ':results', FAILED, ARGV[3], ARGV[1])
  return 2
end
redis.call('HSET', job, 'lease_until_ms', ARGV[2])
redis.call('ZADD', leases, ARGV[2], f[4])
return 1
"""

# KEYS: leases, deadlines. ARGV: now, job key prefix, what a lapsed submission's job says, what
# an overdue job says, most jobs per set per call. Returns {jobs FAILED, jobs EXPIRED}.
_SWEEP = """
local function sweep(set, state, err)
  local ended = 0
  local due = redis.call('ZRANGEBYSCORE', set, '-inf', ARGV[1], 'LIMIT', 0, ARGV[5])
  for _, id in ipairs(due) do
    local job = ARGV[2] .. id
    local f = redis.call('HMGET', job, 'state', 'sealed')
    redis.call('ZREM', set, id)
    if f[1] and active(f[1]) and (state == EXPIRED or f[2] ~= '1') then
      finish(job, job .. ':results', state, err, ARGV[1])
      ended = ended + 1
    end
  end
  return ended
end
return {sweep(leases, FAILED, ARGV[3]), sweep(deadlines, EXPIRED, ARGV[4])}
"""

# The scripts as Redis runs them, by name (a test reads them, so their states cannot drift).
SCRIPTS = {
    "create": _PRELUDE + _CREATE,
    "seal": _PRELUDE + _SEAL,
    "record": _PRELUDE + _RECORD,
    "finish": _PRELUDE + _FINISH,
    "renew": _PRELUDE + _RENEW,
    "sweep": _PRELUDE + _SWEEP,
}


class RedisJobStore:
    """Job records by id (the rules live in jobs.py)."""

    def __init__(self, redis: RedisStore, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}job:"
        self._sets = [self.prefix + "leases", self.prefix + "deadlines"]
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.client.register_script(SCRIPTS[name])
        return self._scripts[name]

    def _keys(self, job_id: str) -> list[str]:
        return [*self._sets, self.prefix + job_id, f"{self.prefix}{job_id}:results"]

    def idempotency_key(self, key: str, owner_key_id: str = "") -> str:
        if not key:
            return ""
        return (
            f"{self.prefix}key:{owner_key_id}:{key}" if owner_key_id else f"{self.prefix}key:{key}"
        )

    def _index(self, owner_key_id: str) -> str:
        return f"{self.prefix}owner:{owner_key_id}" if owner_key_id else self.prefix + "index"

    async def create(self, record: JobRecord, ttl_ms: int, lease_until_ms: int) -> tuple[str, int]:
        """Create a record, or name the job that its idempotency key already names: (id,
        CREATED, KEPT or STREAMING)."""
        key = self.idempotency_key(record.idempotency_key, record.owner_key_id)
        fields = {**to_hash(record), "idempotency_redis_key": key}
        flat = [part for pair in fields.items() for part in pair]
        owned = self._index(record.owner_key_id) if record.owner_key_id else ""
        keys = [*self._sets, key, self.prefix + record.id, self.prefix + "index", owned]
        args = [record.id, record.created_ms, self.prefix, INDEX_SIZE, ttl_ms, lease_until_ms]
        args += [record.expires_ms, LAPSED, *flat]
        with self.redis.translated("job create"):
            found, outcome = await self._script("create")(keys=keys, args=args)
        return _text(found), int(outcome)

    async def get(self, job_id: str) -> JobRecord | None:
        with self.redis.translated("job get"):
            raw = await self.redis.client.hgetall(self.prefix + job_id)
        return from_hash(raw) if raw else None

    async def seal(self, job_id: str, total: int, now_ms: int) -> tuple[bool, JobState | None]:
        """(whether the job exists, the terminal state sealing ended it with)."""
        with self.redis.translated("job seal"):
            found, completed = await self._script("seal")(
                keys=self._keys(job_id), args=[total, now_ms, LATE]
            )
        return int(found) >= 0, _completed(completed)

    async def record(
        self, job_id: str, items: Sequence[tuple[int, bool, bytes]], now_ms: int
    ) -> tuple[int, JobState | None, bool]:
        """(items recorded now, or -1 for an unknown job; the terminal state this ended the
        job with; whether this started the job: QUEUED → RUNNING)."""
        args: list[Any] = [now_ms, LATE]
        for index, ok, payload in items:
            args += [index, "1" if ok else "0", payload]
        with self.redis.translated("job record"):
            recorded, completed, started = await self._script("record")(
                keys=self._keys(job_id), args=args
            )
        return int(recorded), _completed(completed), started == 1

    async def finish(self, job_id: str, state: JobState, error: str, now_ms: int) -> int:
        """-1 unknown job, 0 already terminal, 1 finished now."""
        with self.redis.translated("job finish"):
            return int(
                await self._script("finish")(
                    keys=self._keys(job_id), args=[state.value, error, now_ms]
                )
            )

    async def renew(self, job_id: str, now_ms: int, lease_until_ms: int) -> int:
        """-1 unknown job, 0 no longer taking items (ended or sealed), 1 renewed, 2 FAILED now:
        its lease had lapsed."""
        args = [now_ms, lease_until_ms, LAPSED]
        with self.redis.translated("job renew"):
            return int(await self._script("renew")(keys=self._keys(job_id)[:3], args=args))

    async def sweep(self, now_ms: int, limit: int = SWEEP_LIMIT) -> tuple[int, int]:
        """End the jobs that are due: (FAILED for a lapsed lease, EXPIRED)."""
        args = [now_ms, self.prefix, LAPSED, LATE, limit]
        with self.redis.translated("job sweep"):
            failed, expired = await self._script("sweep")(keys=self._sets, args=args)
        return int(failed), int(expired)

    async def results(self, job_id: str, start: int, limit: int) -> list[bytes]:
        indexes = list(range(start, start + limit))
        with self.redis.translated("job results"):
            values = await self.redis.client.hmget(self._keys(job_id)[3], indexes)
        return [cast(bytes, v) for v in values if v is not None]

    async def recent(self, limit: int, owner_key_id: str = "") -> list[JobRecord]:
        """The newest jobs still kept (of one owner, or all), newest first; ids whose record
        has gone are forgotten."""
        index = self._index(owner_key_id)
        with self.redis.translated("job list"):
            newest = await self.redis.client.zrevrange(index, 0, limit * 2)
            ids = [_text(cast(bytes, i)) for i in newest]
            async with self.redis.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.prefix + job_id)
                records = await pipe.execute()
            gone = [job_id for job_id, r in zip(ids, records, strict=True) if not r]
            if gone:
                await self.redis.client.zrem(index, *gone)
        return [from_hash(r) for r in records if r][:limit]


def to_hash(record: JobRecord) -> dict[str, str]:
    """The record as its Redis hash holds it: strings, a flag as "1" or "0"."""
    return {name: _hash_value(value) for name, value in asdict(record).items()}


def _hash_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)  # a JobState as its value: StrEnum's str()


def from_hash(raw: Mapping[bytes | str, bytes | str]) -> JobRecord:
    """A record from its Redis hash. Fields it lacks (a record written before they existed)
    read as empty or 0; fields the record does not hold (idempotency_redis_key) are skipped."""
    fields = {_text(k): _text(v) for k, v in raw.items()}

    def number(name: str) -> int:
        return int(fields.get(name) or 0)

    return JobRecord(
        id=fields["id"],
        state=JobState(fields["state"]),
        model=fields.get("model", ""),
        version=fields.get("version", ""),
        task=number("task"),
        priority=number("priority"),
        total=number("total"),
        sealed=fields.get("sealed") == "1",
        done=number("done"),
        failed=number("failed"),
        created_ms=number("created_ms"),
        started_ms=number("started_ms"),
        finished_ms=number("finished_ms"),
        expires_ms=number("expires_ms"),
        retention_s=number("retention_s"),
        error=fields.get("error", ""),
        idempotency_key=fields.get("idempotency_key", ""),
        trace_id=fields.get("trace_id", ""),
        owner_key_id=fields.get("owner_key_id", ""),
    )


def _completed(state: bytes | str) -> JobState | None:
    """A script's "the state this call completed the job with", '' for none."""
    return JobState(_text(state)) if state else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
