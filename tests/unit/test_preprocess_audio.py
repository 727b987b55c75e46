"""Audio preprocessing: decoding WAV, FLAC and raw PCM (sine waves written with soundfile),
down-mixing, resampling, the features against transformers' Wav2Vec2FeatureExtractor, and every
kind of bad clip refused with its index named."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
from transformers import Wav2Vec2FeatureExtractor

from fmserve.core.audio import AudioFeatures
from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.errors import InputTooLong, InvalidInput
from fmserve.v1.common_pb2 import Media
from services.preprocess.audio import AudioFeaturizer, AudioLimits, decode, load_clip, padded

pytestmark = pytest.mark.timeout(30)

LIMITS = AudioLimits(max_bytes=1 << 24, max_seconds=60.0)


def sine(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def wav(samples: np.ndarray, rate: int = 16_000, subtype: str = "FLOAT") -> Media:
    return Media(mime_type="audio/wav", data=encoded(samples, rate, "WAV", subtype))


def pcm_s16(samples: np.ndarray, rate: int, channels: int = 1) -> Media:
    data = np.round(samples * 32767).astype("<i2").tobytes()
    return Media(mime_type="audio/pcm", data=data, sample_rate=rate, channels=channels)


@pytest.fixture(scope="module")
def ctc(model_repository: Path) -> ModelConfig:
    return ModelRepository(model_repository).get("tiny-wav2vec2-ctc")


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype", "mime", "tolerance"),
    [
        ("WAV", "FLOAT", "audio/wav", 0.0),
        ("WAV", "PCM_16", "audio/wav", 1 / 32768),
        ("FLAC", "PCM_16", "audio/flac", 1 / 32768),
        ("FLAC", "PCM_24", "audio/flac", 1 / 2**23),
    ],
)
def test_wav_and_flac_decode_to_their_samples(fmt, subtype, mime, tolerance) -> None:
    samples = sine(440, 22_050, 0.5)
    item = Media(mime_type=mime, data=encoded(samples, 22_050, fmt, subtype))

    decoded, rate = decode(item, "media[0]", LIMITS)

    assert rate == 22_050
    assert decoded.shape == (samples.size, 1)
    np.testing.assert_allclose(decoded[:, 0], samples, atol=tolerance)


def test_a_streamed_wav_with_a_placeholder_size_is_read_whole() -> None:
    # as espeak-ng --stdout writes it: the sizes are unknown when the header goes out
    samples = sine(440, 16_000, 0.25)
    data = bytearray(encoded(samples, 16_000, "WAV", "PCM_16"))
    data[4:8] = (0x7FFF_F024).to_bytes(4, "little")
    data[40:44] = (0x7FFF_F000).to_bytes(4, "little")

    decoded, _ = decode(Media(mime_type="audio/wav", data=bytes(data)), "media[0]", LIMITS)

    np.testing.assert_allclose(decoded[:, 0], samples, atol=1 / 32768)


def test_pcm_decodes_s16le_and_f32le_with_their_channels() -> None:
    left, right = sine(440, 8000, 0.25), sine(880, 8000, 0.25)
    stereo = np.stack([left, right], axis=1)

    s16, rate = decode(pcm_s16(stereo.reshape(-1), 8000, channels=2), "media[0]", LIMITS)
    f32_item = Media(
        mime_type="audio/pcm",
        data=stereo.astype("<f4").tobytes(),
        sample_rate=8000,
        channels=2,
        sample_format="f32le",
    )
    f32, _ = decode(f32_item, "media[0]", LIMITS)

    assert rate == 8000
    np.testing.assert_allclose(s16, stereo, atol=1 / 32768)
    np.testing.assert_array_equal(f32, stereo)


def test_stereo_is_averaged_to_mono() -> None:
    left, right = sine(440, 16_000, 0.25), sine(880, 16_000, 0.25)

    clip = load_clip(wav(np.stack([left, right], axis=1)), "media[0]", 16_000, LIMITS)

    np.testing.assert_allclose(clip, (left + right) / 2, atol=1e-6)


def test_resampling_keeps_the_frequency_and_the_duration() -> None:
    tone = sine(1000, 44_100, 1.0)

    clip = load_clip(wav(tone, 44_100), "media[0]", 16_000, LIMITS)

    assert clip.dtype == np.float32
    assert clip.size == 16_000
    assert dominant_frequency(clip, 16_000) == pytest.approx(1000, abs=1.0)
    # a clean tone: most of its energy stays at 1 kHz, none is lost to the new rate
    assert np.sqrt(np.mean(clip[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)


def test_a_clip_at_the_model_rate_is_not_resampled() -> None:
    tone = sine(300, 16_000, 0.3)

    clip = load_clip(wav(tone), "media[0]", 16_000, LIMITS)

    np.testing.assert_array_equal(clip, tone)


# --- features ---------------------------------------------------------------------------------


@pytest.mark.parametrize("do_normalize", [True, False])
def test_features_match_wav2vec2_feature_extractor(do_normalize: bool) -> None:
    rng = np.random.default_rng(0)
    clips = [
        sine(220, 16_000, 0.7) + 0.3,  # an offset that normalising takes away
        rng.normal(0, 0.1, 5000).astype(np.float32),
        sine(1000, 16_000, 0.2, amplitude=0.01),
    ]
    extractor = Wav2Vec2FeatureExtractor(
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=do_normalize,
        return_attention_mask=True,
    )

    ours = padded(clips, AudioFeatures(16_000, do_normalize, 0.0, True))
    theirs = extractor(
        clips, sampling_rate=16_000, padding=True, return_attention_mask=True, return_tensors="np"
    )

    assert ours["input_values"].dtype == np.float32 and ours["lengths"].dtype == np.int32
    np.testing.assert_allclose(ours["input_values"], theirs["input_values"], atol=1e-5)
    np.testing.assert_array_equal(ours["lengths"], theirs["attention_mask"].sum(axis=1))


def test_featurize_pads_with_the_models_padding_value() -> None:
    features = padded(
        [np.ones(3, np.float32), np.ones(5, np.float32)],
        AudioFeatures(do_normalize=False, padding_value=-1.0),
    )

    np.testing.assert_array_equal(features["input_values"][0], [1, 1, 1, -1, -1])
    np.testing.assert_array_equal(features["lengths"], [3, 5])


def test_featurize_reads_the_models_rate_and_normalises(ctc: ModelConfig) -> None:
    tone = sine(440, 8000, 0.5) + 0.2
    media = [pcm_s16(tone, 8000), wav(sine(440, 16_000, 0.25))]

    features = AudioFeaturizer(ctc, ctc.files("1"), LIMITS)(media)

    assert features["input_values"].shape == (2, 8000)
    np.testing.assert_array_equal(features["lengths"], [8000, 4000])
    first = features["input_values"][0]
    assert abs(first.mean()) < 1e-5 and first.std() == pytest.approx(1.0, abs=1e-3)
    assert (features["input_values"][1, 4000:] == 0).all()


# --- bad clips --------------------------------------------------------------------------------


def _truncated_wav() -> bytes:
    data = encoded(sine(440, 16_000, 0.5), 16_000, "WAV", "PCM_16")
    return data[: len(data) // 2]


def _truncated_flac() -> bytes:
    data = encoded(sine(440, 16_000, 0.5), 16_000, "FLAC", "PCM_16")
    return data[: len(data) // 2]


BAD = {
    "unsupported type": (Media(mime_type="audio/mpeg", data=b"ID3..."), "unsupported type"),
    "corrupt": (Media(mime_type="audio/wav", data=b"not a wav file" * 10), "not a readable"),
    "truncated wav": (Media(mime_type="audio/wav", data=_truncated_wav()), "truncated"),
    "truncated flac": (
        Media(mime_type="audio/flac", data=_truncated_flac()),
        "corrupt or truncated",
    ),
    "type mismatch": (
        Media(mime_type="audio/wav", data=encoded(sine(440, 16_000, 0.1), 16_000, "FLAC")),
        "are FLAC, not audio/wav",
    ),
    "empty bytes": (Media(mime_type="audio/wav", data=b""), "empty"),
    "no samples": (
        Media(mime_type="audio/wav", data=encoded(np.zeros(0), 16_000, "WAV")),
        "no samples",
    ),
    "pcm without rate": (Media(mime_type="audio/pcm", data=b"\0\0" * 100), "needs its sample_rate"),
    "pcm partial frame": (
        Media(mime_type="audio/pcm", data=b"\0" * 101, sample_rate=16_000),
        "truncated?",
    ),
    "pcm stereo partial frame": (
        Media(mime_type="audio/pcm", data=b"\0" * 6, sample_rate=16_000, channels=2),
        "truncated?",
    ),
    "pcm unknown format": (
        Media(mime_type="audio/pcm", data=b"\0" * 8, sample_rate=16_000, sample_format="u8"),
        "sample_format 'u8'",
    ),
    "pcm nan": (
        Media(
            mime_type="audio/pcm",
            data=np.array([0.0, np.nan], dtype="<f4").tobytes(),
            sample_rate=16_000,
            sample_format="f32le",
        ),
        "NaN",
    ),
    "too many bytes": (
        Media(mime_type="audio/pcm", data=b"\0" * 2002, sample_rate=16_000),
        "bytes",
    ),
    "too many seconds": (pcm_s16(np.zeros(16_000 * 3, np.float32), 16_000), "3.0 s of audio"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_clip_is_invalid_input_naming_it(ctc: ModelConfig, case: str) -> None:
    bad, fragment = BAD[case]
    good = pcm_s16(sine(440, 16_000, 0.05), 16_000)  # 1600 bytes
    limits = AudioLimits(max_bytes=2000 if case == "too many bytes" else 1 << 20, max_seconds=2.0)

    with pytest.raises(InvalidInput) as caught:
        AudioFeaturizer(ctc, ctc.files("1"), limits)([good, bad])

    assert caught.value.message.startswith("media[1]: "), caught.value.message
    assert fragment in caught.value.message


def test_a_clip_shorter_than_the_models_receptive_field_is_refused(ctc: ModelConfig) -> None:
    # the tiny model's convolutions (kernels 10 and 4, strides 5 and 4) need 25 samples
    media = [wav(sine(440, 16_000, 0.1)), pcm_s16(np.zeros(24, np.float32), 16_000)]

    with pytest.raises(InvalidInput, match=r"media\[1\]: 1\.5 ms of audio; .* at least 1\.5625 ms"):
        AudioFeaturizer(ctc, ctc.files("1"), LIMITS)(media)


def test_a_clip_over_the_models_max_length_is_too_long(ctc: ModelConfig) -> None:
    short = replace(ctc, max_length=16_000)

    with pytest.raises(InputTooLong, match=r"media\[0\]: 1\.5 s of audio; model .* at most 1\.0 s"):
        AudioFeaturizer(short, short.files("1"), LIMITS)([wav(sine(440, 16_000, 1.5))])
