"""Audio clips → a model's input tensors. The one entry point, for the Featurize dispatch:

    AudioFeaturizer(config, files, limits)(media) -> {"input_values": FP32 [clips, samples],
                                                      "lengths": INT32 [clips]}

CPU-bound (decoding, resampling): run it in the caller's executor, never on the event loop.

Each clip is decoded (`soundfile`: WAV, FLAC, and raw little-endian PCM), down-mixed to mono by
averaging its channels, and resampled to the model's rate with `soxr` (libsoxr: high quality at
any pair of rates, fast, and small; scipy's resample_poly would need a rational factor per pair
of rates and scipy itself). Then, as the model's `preprocessor_config.json` says
(Wav2Vec2FeatureExtractor's steps): each clip normalised to zero mean and unit variance over its
own samples when `do_normalize`, and the batch padded with `padding_value` to its longest clip.

Every bad clip is an InvalidInput (InputTooLong for one over a limit) that names it, `media[i]`,
and says what is wrong: unsupported type, corrupt or truncated bytes, a PCM clip without its
rate, empty, too many bytes or seconds.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile
import soxr

from fmserve.core.audio import AudioFeatures, audio_features, framing
from fmserve.core.repository import ModelConfig
from fmserve.errors import InputTooLong, InvalidInput
from services.preprocess.settings import PreprocessSettings

# The container each encoded type must be; audio/pcm is read as RAW with its stated layout.
CONTAINERS = {"audio/wav": "WAV", "audio/x-wav": "WAV", "audio/wave": "WAV", "audio/flac": "FLAC"}
PCM = "audio/pcm"
PCM_FORMATS = {"s16le": ("PCM_16", 2), "f32le": ("FLOAT", 4)}
MAX_PCM_RATE = 768_000
# libsndfile reads a WAV whose data chunk is cut short without complaint, and notes the sizes
# in its log: "data : 64000 (should be 31960)". Streamed WAVs declare a placeholder size.
_SHORT_DATA = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMED_SIZE = 0x7FFF_F000


class Media(Protocol):
    """One clip as it came (fmserve.v1.Media, or anything with its fields)."""

    @property
    def mime_type(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def sample_rate(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def sample_format(self) -> str: ...


@dataclass(frozen=True)
class AudioLimits:
    """What one clip may be, before and after decoding (the preprocess settings)."""

    max_bytes: int
    max_seconds: float


class AudioFeaturizer:
    """A model version's featurizer for audio clips (featurizers.py's LOADERS): its rate,
    normalisation and shortest clip read once from its files."""

    def __init__(self, config: ModelConfig, files: Path, limits: AudioLimits) -> None:
        self.config = config
        self.limits = limits
        self.features = audio_features(config.task, files)
        self.least = framing(config.task, files).min_samples

    @classmethod
    def load(
        cls, config: ModelConfig, files: Path, settings: PreprocessSettings
    ) -> AudioFeaturizer:
        return cls(config, files, AudioLimits(settings.max_audio_bytes, settings.max_audio_s))

    def __call__(self, items: Sequence[Media]) -> dict[str, np.ndarray]:
        """The model's inputs for these clips, in order; the first bad clip raises."""
        rate = self.features.sampling_rate
        clips = []
        for index, item in enumerate(items):
            name = f"media[{index}]"
            clip = load_clip(item, name, rate, self.limits)
            _check_duration(clip, name, rate, self.least, self.config)
            clips.append(clip)
        return padded(clips, self.features)


def padded(clips: list[np.ndarray], features: AudioFeatures) -> dict[str, np.ndarray]:
    """Clips (mono, at the model's rate) normalised as the model asks and padded to one array."""
    lengths = np.array([clip.size for clip in clips], dtype=np.int32)
    values = np.full((len(clips), int(lengths.max())), features.padding_value, dtype=np.float32)
    for row, clip in enumerate(clips):
        values[row, : clip.size] = normalized(clip) if features.do_normalize else clip
    return {"input_values": values, "lengths": lengths}


def normalized(clip: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (the 1e-7 keeps silence finite, as transformers does)."""
    clip64 = clip.astype(np.float64)
    return ((clip64 - clip64.mean()) / np.sqrt(clip64.var() + 1e-7)).astype(np.float32)


def load_clip(item: Media, name: str, rate: int, limits: AudioLimits) -> np.ndarray:
    """One clip decoded, mono, at `rate`: float32 [samples]."""
    samples, source_rate = decode(item, name, limits)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    clip = mono if source_rate == rate else soxr.resample(mono, source_rate, rate)
    return np.ascontiguousarray(clip, dtype=np.float32)


def _check_duration(
    clip: np.ndarray, name: str, rate: int, least: int, config: ModelConfig
) -> None:
    """At most the model's max_length; at least one frame's worth (a shorter clip would crash
    the model's convolutions)."""
    if clip.size > config.max_length:
        raise InputTooLong(
            f"{name}: {clip.size / rate:.1f} s of audio; model {config.name!r} takes at most "
            f"{config.max_length / rate:.1f} s per clip: cut it into shorter clips"
        )
    if clip.size < least:
        raise InvalidInput(
            f"{name}: {clip.size / rate * 1000:g} ms of audio; model {config.name!r} needs at "
            f"least {least / rate * 1000:g} ms"
        )


def decode(item: Media, name: str, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """A clip's samples, float32 [frames, channels], and their rate."""
    if not item.data:
        raise InvalidInput(f"{name}: the clip is empty (no bytes)")
    if len(item.data) > limits.max_bytes:
        raise InputTooLong(
            f"{name}: {len(item.data)} bytes of audio; at most {limits.max_bytes} per clip"
        )
    with _open(item, name) as sound:
        _check_frames(sound, name, limits)
        try:
            samples = sound.read(dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as exc:
            raise _corrupt(name, item.mime_type, exc) from exc
        rate = sound.samplerate
    if not np.isfinite(samples).all():
        raise InvalidInput(f"{name}: the samples hold NaN or infinite values")
    return samples, rate


def _open(item: Media, name: str) -> soundfile.SoundFile:
    mime = item.mime_type.lower()
    if mime == PCM:
        return _open_pcm(item, name)
    if mime not in CONTAINERS:
        accepted = ", ".join([*CONTAINERS, PCM])
        raise InvalidInput(f"{name}: unsupported type {item.mime_type!r}; send one of {accepted}")
    try:
        sound = soundfile.SoundFile(io.BytesIO(item.data))
    except soundfile.LibsndfileError as exc:
        raise _corrupt(name, mime, exc) from exc
    if sound.format != CONTAINERS[mime]:
        sound.close()
        raise InvalidInput(
            f"{name}: the bytes are {sound.format}, not {item.mime_type}; send the right type"
        )
    _check_complete(sound, name)
    return sound


def _open_pcm(item: Media, name: str) -> soundfile.SoundFile:
    sample_format = item.sample_format or "s16le"
    if sample_format not in PCM_FORMATS:
        raise InvalidInput(
            f"{name}: sample_format {sample_format!r}; audio/pcm takes {' or '.join(PCM_FORMATS)}"
        )
    if not 0 < item.sample_rate <= MAX_PCM_RATE:
        raise InvalidInput(
            f"{name}: audio/pcm needs its sample_rate (samples per second, 1 to "
            f"{MAX_PCM_RATE}); got {item.sample_rate}"
        )
    channels = item.channels or 1
    subtype, width = PCM_FORMATS[sample_format]
    if not 0 < channels <= 64:
        raise InvalidInput(f"{name}: channels {channels}; send 1 to 64")
    if len(item.data) % (width * channels):
        raise InvalidInput(
            f"{name}: {len(item.data)} bytes is not a whole number of {sample_format} frames "
            f"of {channels} channel(s) ({width * channels} bytes each): truncated?"
        )
    return soundfile.SoundFile(
        io.BytesIO(item.data),
        samplerate=item.sample_rate,
        channels=channels,
        format="RAW",
        subtype=subtype,
        endian="LITTLE",
    )


def _check_complete(sound: soundfile.SoundFile, name: str) -> None:
    short = _SHORT_DATA.search(sound.extra_info)
    if short and int(short[1]) < _STREAMED_SIZE:
        sound.close()
        raise InvalidInput(
            f"{name}: truncated: the WAV declares {short[1]} bytes of samples but holds "
            f"{short[2]}; send the whole file"
        )


def _check_frames(sound: soundfile.SoundFile, name: str, limits: AudioLimits) -> None:
    if sound.frames <= 0:
        raise InvalidInput(f"{name}: the clip holds no samples")
    seconds = sound.frames / sound.samplerate
    if seconds > limits.max_seconds:
        raise InputTooLong(
            f"{name}: {seconds:.1f} s of audio; at most {limits.max_seconds:g} s per clip: "
            "cut it into shorter clips"
        )


def _corrupt(name: str, mime: str, exc: soundfile.LibsndfileError) -> InvalidInput:
    # libsndfile's own words say what it found ("Format not recognised", "lost sync") without
    # naming anything of the server's
    return InvalidInput(
        f"{name}: not a readable {mime} clip (corrupt or truncated): {exc.error_string}"
    )
