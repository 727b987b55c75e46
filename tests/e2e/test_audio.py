"""Audio end to end through the five services (the session's cluster), called as users call it:
the Python client with WAV files, WAV bytes and numpy waveforms, and the CLI with files. A tiny
wav2vec2 CTC model and audio classifier built from configs are held to the same models run
in-process on preprocess's own features (which tests/unit/test_preprocess_audio.py holds to
Hugging Face's extractor); the bundled Silero VAD to speech synthesised by espeak-ng."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers import AutoTokenizer, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

from fmserve import Client
from fmserve.cli import main as cli
from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.errors import InputTooLong, InvalidInput
from fmserve.v1 import common_pb2
from services.preprocess.audio import AudioFeaturizer, AudioLimits
from tests.audio import spoken

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

RATE = 16_000
SPEECH = "Serving models on your own machines is fun."


@pytest.fixture(scope="module")
def client(gateway_address: str) -> Client:
    with Client(gateway_address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def repository(model_repository: Path) -> ModelRepository:
    return ModelRepository(model_repository)


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spoken(SPEECH, tmp_path_factory.mktemp("speech"))


def wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.2, int(seconds * RATE)).astype(np.float32)


# Two clips as users send them: WAV bytes at another rate (resampled by preprocess), and a
# numpy waveform at the model's rate.
CLIP_WAV = wav(noise(0.9, seed=1), 22_050)
CLIP_WAVEFORM = noise(0.6, seed=2)


def in_process_clips(config: ModelConfig) -> list[torch.Tensor]:
    """Each clip as the model takes it, by preprocess's own steps."""
    media = [
        common_pb2.Media(mime_type="audio/wav", data=CLIP_WAV),
        common_pb2.Media(
            mime_type="audio/pcm",
            data=CLIP_WAVEFORM.astype("<f4").tobytes(),
            sample_rate=RATE,
            sample_format="f32le",
        ),
    ]
    featurizer = AudioFeaturizer(config, config.files(), AudioLimits(1 << 24, 60.0))
    features = featurizer(media)
    rows = zip(features["input_values"], features["lengths"], strict=True)
    return [torch.from_numpy(row[:n].copy())[None] for row, n in rows]


def test_transcriptions_equal_the_ctc_model_in_process(
    client: Client, repository: ModelRepository
) -> None:
    config = repository.get("tiny-wav2vec2-ctc")
    model = Wav2Vec2ForCTC.from_pretrained(config.files()).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.files())

    answers = client.transcribe(
        [CLIP_WAV, CLIP_WAVEFORM], "tiny-wav2vec2-ctc", sample_rate=RATE, cache="bypass"
    )

    assert len(answers) == 2
    for answer, clip in zip(answers, in_process_clips(config), strict=True):
        with torch.inference_mode():
            ids = model(input_values=clip).logits[0].argmax(-1).tolist()
        expected = tokenizer.decode(ids)
        assert answer.text == expected and expected.strip()
        assert [w.word for w in answer.words] == expected.split()
        seconds = clip.shape[1] / RATE
        assert all(0 <= w.start_s < w.end_s <= seconds + 0.02 for w in answer.words)


def test_audio_classification_equals_the_model_in_process(
    client: Client, repository: ModelRepository
) -> None:
    config = repository.get("tiny-audio-classifier")
    model = Wav2Vec2ForSequenceClassification.from_pretrained(config.files()).eval()

    answers = client.classify_audio(
        [CLIP_WAV, CLIP_WAVEFORM], "tiny-audio-classifier", sample_rate=RATE
    )

    for answer, clip in zip(answers, in_process_clips(config), strict=True):
        with torch.inference_mode():
            probabilities = model(input_values=clip).logits[0].softmax(-1).numpy()
        assert [s.label for s in answer] == [config.labels[i] for i in np.argsort(-probabilities)]
        scores = {s.label: s.score for s in answer}
        np.testing.assert_allclose(
            [scores[label] for label in config.labels], probabilities, atol=1e-4
        )


def test_the_vad_finds_espeak_speech_in_a_file_and_none_in_silence(
    client: Client, speech_file: Path
) -> None:
    silence = np.zeros(RATE, dtype=np.float32)

    speech, quiet = client.detect_voice([speech_file, silence], sample_rate=RATE)

    seconds = soundfile.info(str(speech_file)).duration
    assert speech.frame_s == pytest.approx(0.032)
    assert abs(len(speech.frame_probabilities) - seconds * RATE / 512) <= 1
    assert speech.segments and all(
        0 <= s.start_s < s.end_s <= seconds + 0.032 for s in speech.segments
    )
    spoken = sum(s.end_s - s.start_s for s in speech.segments)
    assert spoken > 0.5 * seconds  # espeak speaks all along, with short pauses between words
    assert quiet.segments == [] and max(quiet.frame_probabilities) < 0.5


def test_a_repeated_clip_is_answered_from_the_cache(client: Client) -> None:
    clip = wav(noise(0.5, seed=3), RATE)
    first = client.infer_media([clip], "tiny-wav2vec2-ctc", cache="refresh")
    again = client.infer_media([clip], "tiny-wav2vec2-ctc")
    other = client.infer_media([wav(noise(0.5, seed=4), RATE)], "tiny-wav2vec2-ctc")

    assert not first.cache_hit and again.cache_hit and not other.cache_hit
    assert again.results == first.results
    assert again.task == "speech-recognition"


def test_bad_audio_is_refused_naming_the_clip(client: Client) -> None:
    good = wav(noise(0.3, seed=5), RATE)
    corrupt = b"RIFF" + bytes(4) + b"WAVE" + bytes(40)  # a WAV signature, then nothing readable
    with pytest.raises(InvalidInput, match=r"media\[1\]: ") as caught:
        client.transcribe([good, corrupt], "tiny-wav2vec2-ctc", cache="bypass")
    assert "audio/wav" in caught.value.message
    with pytest.raises(InvalidInput, match=r"media\[0\] has no mime_type: .*audio/wav"):
        client.transcribe([bytes(100)], "tiny-wav2vec2-ctc")
    with pytest.raises(InputTooLong, match=r"media\[0\]: 31\.0 s of audio; .* at most 30\.0 s"):
        client.transcribe([noise(31, seed=6)], "tiny-wav2vec2-ctc", sample_rate=RATE)
    with pytest.raises(ValueError, match="pass sample_rate="):
        client.transcribe([noise(0.3, seed=7)], "tiny-wav2vec2-ctc")  # a waveform without its rate


def test_wrong_kinds_of_input_are_refused_clearly(client: Client) -> None:
    with pytest.raises(
        InvalidInput, match=r"takes audio clips: send them as media \(transcribe\(\)"
    ):
        client.infer(["a text"], "tiny-wav2vec2-ctc")
    with pytest.raises(InvalidInput, match="takes texts, not media"):
        client.infer_media([CLIP_WAV], "tiny-classifier")
    with pytest.raises(InvalidInput, match="speech-recognition, not image-classification"):
        client.classify_images([CLIP_WAV], "tiny-wav2vec2-ctc")


def test_the_cli_transcribes_and_detects_voice_in_files(
    gateway_address: str, tmp_path: Path, speech_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(CLIP_WAV)
    base = ["--address", gateway_address]

    assert cli([*base, "transcribe", "--model", "tiny-wav2vec2-ctc", "--json", str(clip)]) == 0
    answer = json.loads(capsys.readouterr().out)
    with Client(gateway_address) as client:
        [expected] = client.transcribe(clip, "tiny-wav2vec2-ctc")
    assert answer["task"] == "speech-recognition"
    assert answer["results"][0]["text"] == expected.text

    assert cli([*base, "vad", str(speech_file)]) == 0
    printed = capsys.readouterr().out
    assert "silero-vad" in printed and "speech: " in printed and "speech: none" not in printed

    assert cli([*base, "classify", "--model", "tiny-audio-classifier", str(clip)]) == 0
    assert "audio-classification" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="takes audio files"):
        cli([*base, "transcribe", "--model", "tiny-wav2vec2-ctc", "not a file"])
