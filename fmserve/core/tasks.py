"""The tasks fmserve serves: their names in the model repository (`TaskName`) and on the wire
(`fmserve.v1.Task`), one table read in both directions by the gateway, the postprocess service
and the client; and the rules about what a task needs from each stage, which the sync path
(gateway) and the async path (stage workers) both follow."""

from __future__ import annotations

from enum import StrEnum

from fmserve.v1 import common_pb2


class TaskName(StrEnum):
    EMBEDDING = "embedding"
    TEXT_CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    TEXT_GENERATION = "text-generation"
    IMAGE_CLASSIFICATION = "image-classification"
    IMAGE_EMBEDDING = "image-embedding"

    @property
    def takes_images(self) -> bool:
        """Whether the task's model takes images (preprocess's Featurize, not Tokenize)."""
        return self in (TaskName.IMAGE_CLASSIFICATION, TaskName.IMAGE_EMBEDDING)

    @property
    def takes_media(self) -> bool:
        """Whether the task's model takes media (images, audio) as encoded bytes: the gateway
        routes them to preprocess's Featurize. The audio tasks join here."""
        return self.takes_images

    @property
    def takes_texts(self) -> bool:
        """Whether the task's model takes texts: every text task, and CLIP's text tower."""
        return not self.takes_media or self is TaskName.IMAGE_EMBEDDING

    @property
    def postprocess_needs_tokens(self) -> bool:
        """Whether postprocess needs, besides the model's output, the texts, each text's token
        count (lengths) and each token's character offsets: token classification cuts its
        entities out of the texts. Other tasks answer from the output alone."""
        return self is TaskName.TOKEN_CLASSIFICATION

    @property
    def needs_offsets(self) -> bool:
        """Whether preprocess is asked for the tokens' character offsets: only when postprocess
        will need them, as computing and shipping them costs time on every request."""
        return self.postprocess_needs_tokens


TASK_TO_WIRE: dict[TaskName, common_pb2.Task] = {
    TaskName.EMBEDDING: common_pb2.TASK_EMBEDDING,
    TaskName.TEXT_CLASSIFICATION: common_pb2.TASK_TEXT_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION: common_pb2.TASK_TOKEN_CLASSIFICATION,
    TaskName.TEXT_GENERATION: common_pb2.TASK_TEXT_GENERATION,
    TaskName.IMAGE_CLASSIFICATION: common_pb2.TASK_IMAGE_CLASSIFICATION,
    TaskName.IMAGE_EMBEDDING: common_pb2.TASK_IMAGE_EMBEDDING,
}
TASK_FROM_WIRE: dict[common_pb2.Task, TaskName] = {w: t for t, w in TASK_TO_WIRE.items()}
