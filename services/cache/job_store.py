"""Job records in Redis: every change that must be atomic is one Lua script, so concurrent
stages, gateways and cache replicas never see or make a half-done change.

    {prefix}job:{id}          hash    the record: one field per JobRecord field (job_record.py),
                                      plus idempotency_redis_key, the name of the key below
    {prefix}job:{id}:results  hash    item index → serialized fmserve.v1.JobItemResult
    {prefix}job:key:{key}     string  idempotency key → job id
    {prefix}job:index         zset    job id by creation time (ListJobs), newest INDEX_SIZE kept

Job keys carry no TTL while the job runs (so `volatile-lru` never evicts them, see store.py);
when the job reaches a terminal state its three keys get the job's retention as TTL.

Rules the scripts hold: recording an item is HSETNX (a redelivered item never counts twice, and
the counters move only for new items); the item that completes a sealed job sets its terminal
state in the same script; a terminal state is never changed; items of a terminal job are ignored.
The scripts touch the idempotency key through a name they read from the record (a single
Redis instance allows it; Redis Cluster would need hash tags).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, cast

from fmserve.core.jobs import ACTIVE, JobState
from services.cache.job_record import JobRecord
from services.cache.store import RedisStore

INDEX_SIZE = 10_000


def _lua_states() -> str:
    """Every state as a Lua local named like it (`local QUEUED = 'QUEUED'`) and `active(state)`,
    built from JobState: the scripts name states only through these, so they cannot drift from
    the enum (and Redis refuses a misspelt name, an undeclared global, when the script runs)."""
    declared = [f"local {state.name} = '{state.value}'" for state in JobState]
    active = " or ".join(f"state == {state.name}" for state in JobState if state in ACTIVE)
    return "\n".join([*declared, f"local function active(state) return {active} end"])


# Shared by the scripts: complete a sealed job whose items are all answered, and finish a job
# (terminal state, timings, retention TTLs).
_PRELUDE = (
    _lua_states()
    + """
local function finish(job, results, state, err, now)
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
"""
)

# KEYS: idempotency key ('' for none), job, index. ARGV: id, now, job key prefix, then
# field/value pairs, then how many jobs the index keeps.
# Returns the id of the job the key names (when it is still kept, and was not a submission
# that broke off: FAILED before it was sealed), or the new id.
_CREATE = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    local f = redis.call('HMGET', ARGV[3] .. existing, 'state', 'sealed')
    if f[1] and not (f[1] == FAILED and f[2] ~= '1') then return {existing, 0} end
  end
  redis.call('SET', KEYS[1], ARGV[1])
end
local fields = {}
for i = 4, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[#ARGV]) + 1))
return {ARGV[1], 1}
"""

# KEYS: job, results. ARGV: total, now. Returns {-1} unknown, else {1, the terminal state
# this call completed the job with, or ''}.
_SEAL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
if not active(state) or redis.call('HGET', KEYS[1], 'sealed') == '1' then return {1, ''} end
redis.call('HSET', KEYS[1], 'sealed', '1', 'total', ARGV[1])
return {1, complete(KEYS[1], KEYS[2], ARGV[2])}
"""

# KEYS: job, results. ARGV: now, then (index, ok, payload) triples. Returns {-1} for an
# unknown job, else {items recorded now, the terminal state this call completed it with or '',
# 1 if this call started it (QUEUED → RUNNING) else 0}.
_RECORD = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, '', 0} end
if not active(state) then return {0, '', 0} end
local done, failed = 0, 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 2]) == 1 then
    if ARGV[i + 1] == '1' then done = done + 1 else failed = failed + 1 end
  end
end
if done > 0 then redis.call('HINCRBY', KEYS[1], 'done', done) end
if failed > 0 then redis.call('HINCRBY', KEYS[1], 'failed', failed) end
local started = 0
if state == QUEUED and done + failed > 0 then
  redis.call('HSET', KEYS[1], 'state', RUNNING, 'started_ms', ARGV[1])
  started = 1
end
return {done + failed, complete(KEYS[1], KEYS[2], ARGV[1]), started}
"""

# KEYS: job, results. ARGV: state, error, now. Returns -1 unknown, 0 already terminal, 1 done.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if not active(state) then return 0 end
finish(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return 1
"""

# The scripts as Redis runs them, by name (a test reads them, so their states cannot drift).
SCRIPTS = {
    "create": _PRELUDE + _CREATE,
    "seal": _PRELUDE + _SEAL,
    "record": _PRELUDE + _RECORD,
    "finish": _PRELUDE + _FINISH,
}


class RedisJobStore:
    """Job records by id (the rules live in jobs.py)."""

    def __init__(self, redis: RedisStore, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}job:"
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.client.register_script(SCRIPTS[name])
        return self._scripts[name]

    def _keys(self, job_id: str) -> list[str]:
        return [self.prefix + job_id, f"{self.prefix}{job_id}:results"]

    def idempotency_key(self, key: str) -> str:
        return f"{self.prefix}key:{key}" if key else ""

    async def create(self, record: JobRecord) -> tuple[str, bool]:
        """Create a record, or return the job that its idempotency key already names."""
        key = self.idempotency_key(record.idempotency_key)
        fields = {**to_hash(record), "idempotency_redis_key": key}
        flat = [part for pair in fields.items() for part in pair]
        keys = [key, self.prefix + record.id, self.prefix + "index"]
        args = [record.id, record.created_ms, self.prefix, *flat, INDEX_SIZE]
        with self.redis.translated("job create"):
            found, created = await self._script("create")(keys=keys, args=args)
        return _text(found), bool(created)

    async def get(self, job_id: str) -> JobRecord | None:
        with self.redis.translated("job get"):
            raw = await self.redis.client.hgetall(self.prefix + job_id)
        return from_hash(raw) if raw else None

    async def seal(self, job_id: str, total: int, now_ms: int) -> tuple[bool, JobState | None]:
        """(whether the job exists, the terminal state sealing completed it with)."""
        with self.redis.translated("job seal"):
            found, completed = await self._script("seal")(
                keys=self._keys(job_id), args=[total, now_ms]
            )
        return int(found) >= 0, _completed(completed)

    async def record(
        self, job_id: str, items: Sequence[tuple[int, bool, bytes]], now_ms: int
    ) -> tuple[int, JobState | None, bool]:
        """(items recorded now, or -1 for an unknown job; the terminal state this completed the
        job with; whether this started the job: QUEUED → RUNNING)."""
        args: list[Any] = [now_ms]
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

    async def results(self, job_id: str, start: int, limit: int) -> list[bytes]:
        indexes = list(range(start, start + limit))
        with self.redis.translated("job results"):
            values = await self.redis.client.hmget(self._keys(job_id)[1], indexes)
        return [cast(bytes, v) for v in values if v is not None]

    async def recent(self, limit: int) -> list[JobRecord]:
        """The newest jobs still kept, newest first; ids whose record has gone are forgotten."""
        index = self.prefix + "index"
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
    )


def _completed(state: bytes | str) -> JobState | None:
    """A script's "the state this call completed the job with", '' for none."""
    return JobState(_text(state)) if state else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
