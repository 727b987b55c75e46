"""What the client hands its users: plain dataclasses, no protobuf."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fmserve.core.jobs import TERMINAL, JobState

# JobStatus.state spells a state in lower case, as users type it ("succeeded").
TERMINAL_STATES = tuple(state.lower() for state in JobState if state in TERMINAL)


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Entity:
    label: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class WordTiming:
    word: str
    start_s: float
    """Seconds from the start of the clip."""
    end_s: float


@dataclass(frozen=True)
class Transcription:
    """The text spoken in one clip, and when each word was spoken."""

    text: str
    words: list[WordTiming]


@dataclass(frozen=True)
class SpeechSegment:
    start_s: float
    end_s: float


@dataclass(frozen=True)
class VoiceActivity:
    """Where someone speaks in one clip: per frame, the probability of speech; and the frames
    at or over the model's threshold, merged into segments."""

    frame_probabilities: np.ndarray
    frame_s: float
    """Seconds per frame."""
    segments: list[SpeechSegment]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    versions: list[str]
    max_length: int
    labels: list[str]
    dimensions: int
    description: str


@dataclass
class Answer:
    """Everything the gateway said about one Infer call."""

    model: str
    version: str
    task: str
    results: list[Any] = field(default_factory=list)
    """Per input (text, image or clip): a numpy vector, a list of LabelScore, a list of
    Entity, a Transcription or a VoiceActivity."""
    cached: list[bool] = field(default_factory=list)
    trace_id: str = ""
    """The request's distributed trace, when the cluster exports traces."""

    @property
    def cache_hit(self) -> bool:
        return bool(self.cached) and all(self.cached)


@dataclass(frozen=True)
class JobStatus:
    """A job's state and progress. Times are Unix seconds (0: not yet)."""

    id: str
    state: str
    """queued, running, succeeded, failed, cancelled or expired (the last four are final)."""
    model: str
    version: str
    task: str
    priority: str
    total: int
    """Items in the job (known once the submission has ended: `sealed`)."""
    sealed: bool
    done: int
    """Items answered with a result."""
    failed: int
    """Items answered with an error."""
    created: float
    started: float
    finished: float
    expires: float
    error: str
    idempotency_key: str
    trace_id: str = ""
    """The submission's distributed trace, which its items continue (when traces export)."""

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def answered(self) -> int:
        return self.done + self.failed


@dataclass(frozen=True)
class JobItem:
    """One item's answer: its result (as `Client.infer` gives it, or a `Generation` for a
    text-generation job) or why it failed."""

    index: int
    result: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class ApiKey:
    """An API key as an admin sees it: never its secret. Times are Unix seconds (expires 0:
    never); limits of 0 mean unlimited."""

    key_id: str
    name: str
    scopes: list[str]
    created: float
    expires: float
    revoked: bool
    rpm: int
    max_concurrency: int
    daily_items: int


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: `api_key` is shown this once; only its hash is kept."""

    info: ApiKey
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    """Tokens of the prompt, after the chat template."""
    completion_tokens: int
    """Tokens generated."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cache the engine reused from an earlier request."""


@dataclass(frozen=True)
class GenerationParams:
    """How a generation chooses its tokens and when it stops. `generate`, `stream` and
    `submit(task="generate")` take these fields as keyword arguments, or whole as `params=`
    (keywords given beside it override its fields). The gateway checks every value."""

    max_new_tokens: int | None = 64
    """Most tokens to generate; None: the model's default."""
    temperature: float = 0.0
    """0 is greedy; higher is more random."""
    top_p: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """The same seed and prompt give the same tokens; None: random."""
    stop: str | Sequence[str] = ()
    """Stop before any of these strings (not included in the text)."""
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = ()
    """Stop at any of these token ids (EOS always stops)."""


@dataclass(frozen=True)
class GenerationDelta:
    """Text and tokens produced since the previous delta of a stream."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Generation:
    """A finished generation."""

    text: str
    """The generated text, without the prompt and without the stop string that ended it."""
    finish_reason: str
    """"stop" (EOS, a stop token or string), "length" (max_new_tokens, the context) or
    "cancelled" (the serving replica shut down mid-answer: the text so far)."""
    usage: Usage
    token_ids: list[int]
    cached: bool = False
    """True when the gateway answered from its result cache."""
    model: str = ""
    version: str = ""
    trace_id: str = ""


@dataclass(frozen=True)
class Guard:
    """When a canary is rolled back on its own: an error ratio (0-1) or a p99 latency (ms)
    over a window of seconds, judged once it holds `min_requests`. 0 turns a limit off (and a
    window or minimum of 0 means the gateway's default: 60 s, 20 requests)."""

    max_error_ratio: float = 0.0
    max_p99_ms: float = 0.0
    window_s: int = 0
    min_requests: int = 0


@dataclass(frozen=True)
class TrafficPolicy:
    """How a model's requests that name no version are split between its versions."""

    model: str
    stable: str
    canary: str = ""
    canary_percent: int = 0
    sticky: bool = False
    """Route by the request's routing_key: the same key always reaches the same version."""
    shadow: str = ""
    """Gets a copy of every request; its answers are counted, never returned."""
    guard: Guard = Guard()
    previous: str = ""
    """The stable version before the last promote (where a rollback without canary goes)."""
    state: str = ""
    """The last rollout's state: serving, failed, promoted or rolled_back ('' none)."""
    state_version: str = ""
    reason: str = ""
    revision: int = 0


@dataclass(frozen=True)
class VersionInfo:
    """One model version as `fmserve models --versions` shows it."""

    model: str
    version: str
    state: str
    """LOADING, WARMING, READY, UNLOADING, FAILED, ... (the inference service's)."""
    reason: str
    memory_bytes: int
    traffic_percent: float
    shadow: bool
    requests: int
    """Requests the answering gateway sent this version over the last `window_s` seconds."""
    errors: int
    window_s: int

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0
