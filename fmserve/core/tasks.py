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
    AUDIO_CLASSIFICATION = "audio-classification"
    SPEECH_RECOGNITION = "speech-recognition"
    VOICE_ACTIVITY = "voice-activity"
    IMAGE_CLASSIFICATION = "image-classification"
    IMAGE_EMBEDDING = "image-embedding"

    @property
    def takes_images(self) -> bool:
        """Whether the task's model takes images (preprocess's Featurize, not Tokenize)."""
        return self in (TaskName.IMAGE_CLASSIFICATION, TaskName.IMAGE_EMBEDDING)

    @property
    def takes_media(self) -> bool:
        """Whether the task's model takes media (images, audio) as encoded bytes: the gateway
        routes them to preprocess's Featurize."""
        return self.takes_images or self.takes_audio

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

    @property
    def takes_audio(self) -> bool:
        """Whether the model's input is audio clips (input_values [clips, samples] at the
        model's rate), not token ids."""
        return self in AUDIO_TASKS

    @property
    def per_frame(self) -> bool:
        """Whether the model answers one row per audio frame (speech recognition's logits,
        voice activity's probabilities) rather than one per clip; such outputs come with
        each clip's frame count."""
        return self in (TaskName.SPEECH_RECOGNITION, TaskName.VOICE_ACTIVITY)


AUDIO_TASKS = frozenset(
    {TaskName.AUDIO_CLASSIFICATION, TaskName.SPEECH_RECOGNITION, TaskName.VOICE_ACTIVITY}
)


TASK_TO_WIRE: dict[TaskName, common_pb2.Task] = {
    TaskName.EMBEDDING: common_pb2.TASK_EMBEDDING,
    TaskName.TEXT_CLASSIFICATION: common_pb2.TASK_TEXT_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION: common_pb2.TASK_TOKEN_CLASSIFICATION,
    TaskName.TEXT_GENERATION: common_pb2.TASK_TEXT_GENERATION,
    TaskName.AUDIO_CLASSIFICATION: common_pb2.TASK_AUDIO_CLASSIFICATION,
    TaskName.SPEECH_RECOGNITION: common_pb2.TASK_SPEECH_RECOGNITION,
    TaskName.VOICE_ACTIVITY: common_pb2.TASK_VOICE_ACTIVITY,
    TaskName.IMAGE_CLASSIFICATION: common_pb2.TASK_IMAGE_CLASSIFICATION,
    TaskName.IMAGE_EMBEDDING: common_pb2.TASK_IMAGE_EMBEDDING,
}
TASK_FROM_WIRE: dict[common_pb2.Task, TaskName] = {w: t for t, w in TASK_TO_WIRE.items()}
