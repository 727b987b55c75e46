"""Model routing: from a request's model, version and task to the `Route` every stage uses."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.core.tasks import TaskName
from fmserve.errors import ConfigError, InvalidInput, TooLarge, WrongTask
from services.gateway.media import Media, media_problem
from services.gateway.policies import PolicyBook


@dataclass(frozen=True)
class Route:
    """Where a request's texts go and what is asked of each: everything that changes an
    answer (its cache key)."""

    model: str
    version: str
    task: TaskName
    truncate: bool = False
    top_k: int = 0
    """Labels to keep per text (classification); 0 keeps all. It only cuts each text's answer,
    so texts asking different values still share a batch (see `lane`)."""
    media: bool = False
    """The inputs are media (images, audio clips) for Featurize, not texts for Tokenize: CLIP
    takes both, in separate batches."""
    item_bytes: int = 0
    """Media routes: the bytes of one item once featurized (an image's FP32 pixel_values, an
    audio clip's longest FP32 samples), which size the batches so that each hop's message fits."""

    def items_fitting(self, max_bytes: int) -> int:
        """How many of a media route's items fit `max_bytes` once featurized (at least one)."""
        return max(1, max_bytes // max(1, self.item_bytes))

    @property
    def lane(self) -> Route:
        """What a batch shares: what changes the work of each stage (model, version, task,
        truncation), without the options that only cut each text's answer. One batcher per
        lane, so however many values clients choose for such options, the batchers stay as
        few as the models served."""
        return replace(self, top_k=0)


FP32_BYTES = 4
ALIKE = {(TaskName.EMBEDDING, TaskName.IMAGE_EMBEDDING)}
"""(asked, served): tasks a model serves under another's name: CLIP embeds texts too, so
`embed(texts, model="clip")` is its text embeddings."""
LABELLED = (TaskName.TEXT_CLASSIFICATION, TaskName.IMAGE_CLASSIFICATION)
"""Tasks whose answers are labels that top_k cuts (zero-shot labels are cut after the cache)."""


def _item_bytes(config: ModelConfig, media: bool) -> int:
    """One media item's bytes once featurized: an image's FP32 pixels, or an audio clip's FP32
    samples at the model's longest (its max_length, 30 s unless model.toml says otherwise)."""
    if not media:
        return 0
    if config.task.takes_audio:
        return config.max_length * FP32_BYTES
    return 3 * config.image_size**2 * FP32_BYTES


def _check_input_kind(config: ModelConfig, media: bool) -> None:
    task = config.task
    if media and not task.takes_media:
        raise InvalidInput(f"model {config.name!r} does {task.value} and takes texts, not media")
    if not media and not task.takes_texts:
        raise InvalidInput(
            f"model {config.name!r} does {task.value} and takes {_media_kind(task)}: send them "
            f"as media ({_media_call(task)})"
        )


def _media_kind(task: TaskName) -> str:
    return "audio clips" if task.takes_audio else "images"


def _media_call(task: TaskName) -> str:
    calls = {
        TaskName.SPEECH_RECOGNITION: "transcribe(), or `fmserve transcribe --model NAME clip.wav`",
        TaskName.VOICE_ACTIVITY: "detect_voice(), or `fmserve vad --model NAME clip.wav`",
        TaskName.AUDIO_CLASSIFICATION: "classify_audio(), or `fmserve classify --model NAME a.wav`",
    }
    return calls.get(task, "classify_images(), or `fmserve classify --model NAME photo.jpg`")


class Router:
    """Resolves requests against the model repository and refuses what no model can answer.
    The version is decided here, once: the one a request names (pinned), else the one its
    model's traffic policy chooses (`policies`), else the model's default."""

    def __init__(
        self,
        repository: ModelRepository,
        max_items: int,
        max_text_chars: int,
        policies: PolicyBook | None = None,
    ) -> None:
        self.repository = repository
        self.max_items = max_items
        self.max_text_chars = max_text_chars
        self.policies = policies

    def route(
        self,
        model: str,
        version: str,
        task: TaskName | None,
        truncate: bool,
        top_k: int,
        routing_key: str = "",
        media: bool = False,
    ) -> Route:
        if not model:
            raise InvalidInput("model is required; `fmserve models` lists the models served")
        config = self.repository.get(model)
        if task is not None and task is not config.task and (task, config.task) not in ALIKE:
            raise WrongTask(f"model {model!r} does {config.task.value}, not {task.value}")
        if config.task is TaskName.TEXT_GENERATION and task is None:
            raise WrongTask(
                f"model {model!r} does text-generation: call Generate (generate()), or submit "
                "a job with task text-generation (submit(..., task='generate'))"
            )
        if top_k < 0:
            raise InvalidInput(f"top_k must be 0 (all labels) or positive, got {top_k}")
        _check_input_kind(config, media)
        top_k = top_k if config.task in LABELLED else 0
        version = config.resolve_version(version or self._chosen(model, routing_key))
        return Route(
            model, version, config.task, truncate, top_k, media, _item_bytes(config, media)
        )

    def check_media(self, media: list[Media]) -> None:
        if len(media) > self.max_items:
            raise TooLarge(
                f"{len(media)} media items in one request; the limit is {self.max_items}: "
                "split the request"
            )
        for i, item in enumerate(media):
            if problem := media_problem(item):
                raise InvalidInput(f"media[{i}] {problem}")

    def _chosen(self, model: str, routing_key: str) -> str:
        """The policy's choice for a request that names no version ('' without a policy)."""
        split = self.policies.split(model) if self.policies else None
        return split.choose(routing_key) if split else ""

    def shadow(self, route: Route) -> Route | None:
        """The route of a request's copy for its model's shadow version, if it has one."""
        split = self.policies.split(route.model) if self.policies else None
        if split is None or not split.shadow or split.shadow == route.version:
            return None
        return replace(route, version=split.shadow)

    def check_texts(self, texts: list[str]) -> None:
        if not texts:
            raise InvalidInput("texts is empty: send at least one text")
        if len(texts) > self.max_items:
            raise TooLarge(
                f"{len(texts)} texts in one request; the limit is {self.max_items}: split the "
                "request, or submit a batch job"
            )
        for i, text in enumerate(texts):
            if problem := self.text_problem(text):
                raise InvalidInput(f"texts[{i}] {problem}")

    def text_problem(self, text: str) -> str | None:
        """Why no model can take this text ("is empty: …"), or None. The sync path refuses the
        request over it; a job records that item as failed."""
        if not text.strip():
            return "is empty: every text needs some content"
        if len(text) > self.max_text_chars:
            return f"has {len(text)} characters; the limit is {self.max_text_chars}"
        return None

    def models(self) -> list[ModelConfig]:
        """Every usable model; one with a broken model.toml is left out (the repository logs
        why)."""
        usable = []
        for name in self.repository.names():
            try:
                usable.append(self.repository.get(name))
            except ConfigError:
                continue
        return usable
