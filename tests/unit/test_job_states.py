"""The job vocabulary (fmserve.core.jobs): one JobState, its wire mapping, and the lower-case
names the client shows."""

from __future__ import annotations

import pytest

from fmserve.client.types import TERMINAL_STATES
from fmserve.client.wire import state_name
from fmserve.core.jobs import ACTIVE, TERMINAL, JobState, state_from_wire, state_to_wire
from fmserve.v1 import jobs_pb2

pytestmark = pytest.mark.timeout(10)


def test_every_wire_state_but_unspecified_is_a_job_state_of_the_same_name() -> None:
    wire = set(jobs_pb2.JobState.values()) - {jobs_pb2.JOB_STATE_UNSPECIFIED}
    assert {state_to_wire(state) for state in JobState} == wire
    for state in JobState:
        assert jobs_pb2.JobState.Name(state_to_wire(state)) == f"JOB_STATE_{state.value}"
        assert state_from_wire(state_to_wire(state)) is state


@pytest.mark.parametrize("value", [jobs_pb2.JOB_STATE_UNSPECIFIED, 99])
def test_an_unknown_wire_state_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match=f"unknown job state {value}"):
        state_from_wire(value)


def test_a_state_is_active_or_terminal_never_both() -> None:
    assert {state.name for state in ACTIVE} == {"QUEUED", "RUNNING"}
    assert set(JobState) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL


def test_the_client_names_states_in_lower_case() -> None:
    assert state_name(jobs_pb2.JOB_STATE_SUCCEEDED) == "succeeded"
    assert state_name(jobs_pb2.JOB_STATE_UNSPECIFIED) == "unspecified"
    assert TERMINAL_STATES == ("succeeded", "failed", "cancelled", "expired")
