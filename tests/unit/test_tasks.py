"""The task table and the task rules both paths (gateway and stage workers) follow."""

from __future__ import annotations

import pytest

from fmserve.core.tasks import TASK_FROM_WIRE, TASK_TO_WIRE, TaskName
from fmserve.v1 import common_pb2

pytestmark = pytest.mark.timeout(10)


def test_every_task_has_one_wire_value_and_back() -> None:
    assert set(TASK_TO_WIRE) == set(TaskName)
    assert all(TASK_FROM_WIRE[wire] is task for task, wire in TASK_TO_WIRE.items())
    assert common_pb2.TASK_UNSPECIFIED not in TASK_FROM_WIRE


def test_only_token_classification_needs_the_tokens_at_postprocess() -> None:
    needing = {task for task in TaskName if task.postprocess_needs_tokens}
    assert needing == {TaskName.TOKEN_CLASSIFICATION}


@pytest.mark.parametrize("task", list(TaskName), ids=str)
def test_offsets_are_asked_for_exactly_when_postprocess_needs_them(task: TaskName) -> None:
    assert task.needs_offsets is task.postprocess_needs_tokens


def test_the_audio_tasks_take_audio_and_two_answer_per_frame() -> None:
    audio = {task for task in TaskName if task.takes_audio}
    assert audio == {
        TaskName.AUDIO_CLASSIFICATION,
        TaskName.SPEECH_RECOGNITION,
        TaskName.VOICE_ACTIVITY,
    }
    per_frame = {task for task in TaskName if task.per_frame}
    assert per_frame == {TaskName.SPEECH_RECOGNITION, TaskName.VOICE_ACTIVITY}
