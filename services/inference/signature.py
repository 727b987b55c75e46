"""The tensors a model takes and gives, in Triton's terms; ModelMetadata, ModelConfig and
ModelInfer all read them from here so they never disagree. Shapes include the batch dimension;
-1 is variable."""

from __future__ import annotations

from dataclasses import dataclass

from fmserve.core.repository import ModelConfig
from fmserve.core.tasks import TaskName


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


INPUT_IDS = TensorSpec("input_ids", "INT64", (-1, -1))
"""[B, T] padded, or [total_tokens] together with `lengths` (ragged)."""
ATTENTION_MASK = TensorSpec("attention_mask", "INT64", (-1, -1), optional=True)
"""Padded form only; all ones when absent."""
LENGTHS = TensorSpec("lengths", "INT32", (-1, 1), optional=True)
"""Ragged form: tokens per sequence, summing to input_ids' length. Declared [B, 1], one count
per batch item, so tools that build inputs from ModelConfig (perf_analyzer) can shape it; [B]
is accepted too (what fmserve's gateway sends)."""
INPUTS = (INPUT_IDS, ATTENTION_MASK, LENGTHS)
PIXEL_VALUES = "pixel_values"
"""Image models: FP32 [B, 3, H, W], each image as the model's processor made it (preprocess's
Featurize), H and W the model's image size."""

# Audio models: clips at the model's rate, zero-padded to the longest, with each clip's samples
# (all of every row when absent).
INPUT_VALUES = TensorSpec("input_values", "FP32", (-1, -1))
AUDIO_INPUTS = (INPUT_VALUES, LENGTHS)
FRAMES = TensorSpec("frames", "INT32", (-1, 1))
"""Per-frame outputs (speech recognition, voice activity): each clip's frames, [B, 1] as
`lengths` is declared (one count per batch item, a shape perf_analyzer can read); the output's
rows are zero-padded to the longest clip's."""

# Text generation (ModelStreamInfer): one prompt per request, no batch dimension.
PROMPT_IDS = TensorSpec("input_ids", "INT64", (1, -1))
STOP_TOKEN_IDS = TensorSpec("stop_token_ids", "INT64", (-1,), optional=True)
TOKEN_IDS = TensorSpec("token_ids", "INT64", (1, -1))
"""Each streamed response's new tokens, usually one."""


def inputs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    """What a model takes. CLIP (image-embedding) takes images or texts: each input is
    optional, and one request sends one kind."""
    if config.task is TaskName.TEXT_GENERATION:
        return (PROMPT_IDS, STOP_TOKEN_IDS)
    if config.task.takes_audio:
        return AUDIO_INPUTS
    if not config.task.takes_images:
        return INPUTS
    size = config.image_size
    pixels = TensorSpec(PIXEL_VALUES, "FP32", (-1, 3, size, size))
    if config.task is TaskName.IMAGE_CLASSIFICATION:
        return (pixels,)
    return (TensorSpec(PIXEL_VALUES, "FP32", pixels.shape, optional=True), *_optional(INPUTS))


def _optional(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, s.datatype, s.shape, optional=True) for s in specs)


def outputs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    """Every output of a model: its main one, and `frames` after a per-frame one."""
    if config.task.per_frame:
        return (output(config), FRAMES)
    return (output(config),)


def output(config: ModelConfig) -> TensorSpec:
    """The main output of a model: `embeddings` [B, D] (of texts or images), `logits` [B, C] /
    [B, T, C] (a CTC model's [clips, frames, vocab]), a voice-activity model's `probabilities`
    [clips, frames], or a generation's streamed `token_ids` [1, k]."""
    if config.task is TaskName.VOICE_ACTIVITY:
        return TensorSpec("probabilities", "FP32", (-1, -1))
    if config.task is TaskName.SPEECH_RECOGNITION:
        return TensorSpec("logits", "FP32", (-1, -1, -1))
    if config.task is TaskName.TEXT_GENERATION:
        return TOKEN_IDS
    if config.task in (TaskName.EMBEDDING, TaskName.IMAGE_EMBEDDING):
        return TensorSpec("embeddings", "FP32", (-1, config.dimensions or -1))
    classes = len(config.labels) or -1
    if config.task is TaskName.TOKEN_CLASSIFICATION:
        return TensorSpec("logits", "FP32", (-1, -1, classes))
    return TensorSpec("logits", "FP32", (-1, classes))
