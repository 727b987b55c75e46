"""The postprocess service's one domain entry: checks a batch of model outputs against its
model's config and runs its task's postprocessing, in a worker thread when the batch is big (or
when it decodes speech: its tokenizer loads there on first use)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from fmserve.core.audio import seconds_per_frame
from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput, WrongTask
from services.postprocess import validation
from services.postprocess.classification import classify
from services.postprocess.entities import find_entities
from services.postprocess.results import Embedding, Entities, Result
from services.postprocess.transcription import CtcDecoders
from services.postprocess.voice_activity import voice_activity


@dataclass(frozen=True)
class ModelOutputs:
    """One batch of a model's outputs and what the caller knows about it."""

    model: str
    output: np.ndarray
    """"embeddings" [items, dim], "logits" [items, labels] / [total_tokens, labels] (an item is
    a text or an image), a CTC model's "logits" [clips, frames, vocab] or a VAD's
    "probabilities" [clips, frames]."""
    version: str = ""
    task: TaskName | None = None
    """None: the model's own task."""
    texts: Sequence[str] = field(default_factory=list)
    lengths: np.ndarray | None = None
    """Token classification: tokens per text; per-frame outputs: frames per clip."""
    offsets: np.ndarray | None = None
    top_k: int = 0


class Postprocessor:
    """Owns the threads that postprocess big batches."""

    def __init__(
        self, repository: ModelRepository, offload_min_rows: int = 128, threads: int = 2
    ) -> None:
        self.repository = repository
        self.offload_min_rows = offload_min_rows
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="postprocess")
        self.ctc_decoders = CtcDecoders()
        self._tasks: dict[TaskName, Task] = {
            **_TASKS,
            TaskName.SPEECH_RECOGNITION: partial(transcriptions, self.ctc_decoders),
        }

    async def start(self) -> None:
        """Nothing to prepare: labels are read from the repository per request."""

    async def stop(self) -> None:
        """Called once calls have drained: drop queued work; a running one ends in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.ctc_decoders.clear()

    async def run(self, outputs: ModelOutputs) -> list[Result]:
        """One result per text or clip, in order."""
        config = self.repository.get(outputs.model)
        config.resolve_version(outputs.version)
        task = task_of(config, outputs.task)
        work = partial(self._tasks[task], outputs, config)
        inline = task is not TaskName.SPEECH_RECOGNITION
        if inline and _rows(outputs.output) < self.offload_min_rows:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)


def _rows(output: np.ndarray) -> int:
    return int(output.shape[0]) if output.ndim else 1


def task_of(config: ModelConfig, task: TaskName | None) -> TaskName:
    """The task to postprocess for: the model's own; asking for another is an error."""
    if task is not None and task is not config.task:
        raise WrongTask(f"model {config.name!r} does {config.task}, not {task}; ask for its task")
    return config.task


def embeddings(outputs: ModelOutputs, config: ModelConfig) -> list[Result]:
    """Rows as they are: the inference service has already pooled and normalised them."""
    validation.check_matrix(outputs.output, "embeddings")
    validation.check_rows(outputs.output, "embeddings", outputs.texts)
    return [Embedding(row) for row in outputs.output]


def classifications(outputs: ModelOutputs, config: ModelConfig) -> list[Result]:
    if outputs.top_k < 0:
        raise InvalidInput(f"top_k is {outputs.top_k}; use 0 for all labels, or more")
    validation.check_matrix(outputs.output, "logits")
    validation.check_rows(outputs.output, "logits", outputs.texts)
    validation.check_labels(outputs.output, config.name, config.labels)
    return list(classify(outputs.output, config.labels, outputs.top_k))


def entities(outputs: ModelOutputs, config: ModelConfig) -> list[Result]:
    logits = outputs.output
    validation.check_matrix(logits, "logits")
    validation.check_labels(logits, config.name, config.labels)
    lengths, offsets = validation.check_tokens(
        logits, outputs.texts, outputs.lengths, outputs.offsets
    )
    found = find_entities(logits, lengths, offsets, outputs.texts, config.labels)
    return [Entities(spans) for spans in found]


def transcriptions(
    decoders: CtcDecoders, outputs: ModelOutputs, config: ModelConfig
) -> list[Result]:
    """A CTC model's logits [clips, frames, vocab] and frames per clip → text and words."""
    logits = outputs.output
    frames = validation.check_frames(logits, "logits", outputs.lengths, ndim=3)
    decoder = decoders.get(config, config.resolve_version(outputs.version))
    if logits.shape[2] != decoder.vocab_size:
        raise InvalidInput(
            f"output (logits) has {logits.shape[2]} columns but model {config.name!r} has "
            f"{decoder.vocab_size} tokens; send the logits of this model and version"
        )
    return [decoder.decode(row[:n]) for row, n in zip(logits, frames.tolist(), strict=True)]


def voice_activities(outputs: ModelOutputs, config: ModelConfig) -> list[Result]:
    """A VAD's speech probabilities [clips, frames] and frames per clip → segments."""
    probabilities = outputs.output
    frames = validation.check_frames(probabilities, "probabilities", outputs.lengths, ndim=2)
    frame_s = seconds_per_frame(config.task, config.files(outputs.version))
    return [
        voice_activity(row[:n], frame_s, config.vad)
        for row, n in zip(probabilities, frames.tolist(), strict=True)
    ]


Task = Callable[[ModelOutputs, ModelConfig], list[Result]]
_TASKS: dict[TaskName, Task] = {
    TaskName.EMBEDDING: embeddings,
    TaskName.TEXT_CLASSIFICATION: classifications,
    TaskName.TOKEN_CLASSIFICATION: entities,
    TaskName.AUDIO_CLASSIFICATION: classifications,
    TaskName.VOICE_ACTIVITY: voice_activities,
    TaskName.IMAGE_CLASSIFICATION: classifications,
    TaskName.IMAGE_EMBEDDING: embeddings,  # CLIP's image or text embeddings, as they are
}
