"""The tasks fmserve serves: their names in the model repository (`TaskName`) and on the wire
(`fmserve.v1.Task`), one table read in both directions by the gateway, the postprocess service
and the client."""

from __future__ import annotations

from enum import StrEnum

from fmserve.v1 import common_pb2


class TaskName(StrEnum):
    EMBEDDING = "embedding"
    TEXT_CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"


TASK_TO_WIRE: dict[TaskName, common_pb2.Task] = {
    TaskName.EMBEDDING: common_pb2.TASK_EMBEDDING,
    TaskName.TEXT_CLASSIFICATION: common_pb2.TASK_TEXT_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION: common_pb2.TASK_TOKEN_CLASSIFICATION,
}
TASK_FROM_WIRE: dict[common_pb2.Task, TaskName] = {w: t for t, w in TASK_TO_WIRE.items()}
