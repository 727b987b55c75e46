"""The cache service's job records without Redis: the Lua scripts spell states only as JobState
does, and a record converts to its Redis hash and to the wire and back without loss."""

from __future__ import annotations

import re

import pytest

from fmserve.core.jobs import ACTIVE, JobState
from fmserve.v1 import common_pb2, jobs_pb2
from services.cache import job_codec
from services.cache.job_record import JobRecord
from services.cache.job_store import SCRIPTS, from_hash, to_hash

pytestmark = pytest.mark.timeout(10)

DECLARATION = re.compile(r"^local (\w+) = '(\w+)'$", re.MULTILINE)
QUOTED = re.compile(r"'[^']*'")
LUA_NAMES = {"KEYS", "ARGV"}

RECORD = JobRecord(
    id="a" * 32,
    state=JobState.RUNNING,
    model="minilm-embed",
    version="1",
    task=common_pb2.TASK_EMBEDDING,
    priority=jobs_pb2.JOB_PRIORITY_HIGH,
    total=3,
    sealed=True,
    done=1,
    failed=1,
    created_ms=1_000,
    started_ms=2_000,
    expires_ms=9_000,
    retention_s=60,
    idempotency_key="k",
    trace_id="t",
)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_declares_every_state_as_the_enum_spells_it(name: str) -> None:
    declared = dict(DECLARATION.findall(SCRIPTS[name]))
    assert declared == {state.name: state.value for state in JobState}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_names_states_only_through_the_declarations(name: str) -> None:
    body = DECLARATION.sub("", SCRIPTS[name])
    quoted = {word.strip("'") for word in QUOTED.findall(body)}
    assert not quoted & set(JobState), "a state spelled as a literal: use its declared name"
    # Outside quotes, every upper-case word is a declared state (or Lua's KEYS and ARGV).
    words = set(re.findall(r"\b[A-Z][A-Z_]+\b", QUOTED.sub("", body)))
    assert words - LUA_NAMES <= {state.name for state in JobState}


def test_the_scripts_active_is_the_enums() -> None:
    active = re.search(r"local function active\(state\) return (.*) end", SCRIPTS["seal"])
    assert active is not None
    assert set(re.findall(r"state == (\w+)", active[1])) == {s.name for s in ACTIVE}


def test_a_record_survives_its_redis_hash() -> None:
    raw = {key.encode(): value.encode() for key, value in to_hash(RECORD).items()}
    assert to_hash(RECORD)["state"] == "RUNNING" and to_hash(RECORD)["sealed"] == "1"
    assert from_hash(raw) == RECORD


def test_a_hash_written_before_a_field_existed_reads_it_as_empty() -> None:
    # What CreateJob wrote before finished_ms, started_ms and error were written up front.
    old = {"id": "b" * 32, "state": "QUEUED", "total": "0", "sealed": "0", "retention_s": "60"}
    old |= {"idempotency_redis_key": ""}
    record = from_hash(old)
    assert (record.state, record.started_ms, record.error, record.sealed) == (
        JobState.QUEUED,
        0,
        "",
        False,
    )


def test_a_record_goes_to_the_wire_whole() -> None:
    job = job_codec.to_wire(RECORD)
    assert job.state == jobs_pb2.JOB_STATE_RUNNING
    assert (job.id, job.task, job.priority) == (RECORD.id, RECORD.task, RECORD.priority)
    assert (job.total, job.sealed, job.done, job.failed) == (3, True, 1, 1)
    assert (job.created_unix_ms, job.started_unix_ms, job.expires_unix_ms) == (1000, 2000, 9000)
    assert (job.retention_s, job.idempotency_key, job.trace_id) == (60, "k", "t")


def test_a_create_request_decides_only_what_the_client_may() -> None:
    request = job_codec.to_wire(RECORD)
    new = job_codec.new_job(request)
    assert (new.model, new.task, new.retention_s, new.idempotency_key) == (
        "minilm-embed",
        common_pb2.TASK_EMBEDDING,
        60,
        "k",
    )
    assert (new.id, new.state, new.total, new.done, new.created_ms) == ("", "QUEUED", 0, 0, 0)
