"""Postprocessing of audio models' outputs: CTC greedy decoding with word timings on constructed
logits, speech segments from voice activity probabilities, audio classification, and the
refusals of outputs that do not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmserve.core.repository import ModelRepository, Vad
from fmserve.core.tasks import TaskName
from fmserve.errors import InvalidInput, WrongTask
from services.postprocess.postprocessor import ModelOutputs, Postprocessor
from services.postprocess.results import Classification, Segment, Transcription, VoiceActivity
from services.postprocess.voice_activity import segments
from tests.models import AUDIO_LABELS, CTC_VOCAB

pytestmark = pytest.mark.timeout(30)

ID = {token: i for i, token in enumerate(CTC_VOCAB)}
FRAME_S = 20 / 16_000  # the tiny CTC model: conv strides 5 x 4 at 16 kHz
BLANK = "<pad>"


def one_hot(tokens: list[str], frames: int | None = None) -> np.ndarray:
    """Logits whose argmax per frame is the given token; rows past the tokens are zeros."""
    logits = np.zeros((frames or len(tokens), len(CTC_VOCAB)), dtype=np.float32)
    for frame, token in enumerate(tokens):
        logits[frame, ID[token]] = 5.0
    return logits


@pytest.fixture(scope="module")
def postprocessor(model_repository: Path) -> Postprocessor:
    return Postprocessor(ModelRepository(model_repository))


async def transcribe(postprocessor: Postprocessor, logits: np.ndarray, frames: list[int]):
    outputs = ModelOutputs(
        model="tiny-wav2vec2-ctc",
        output=logits,
        lengths=np.array(frames, dtype=np.int32),
        task=TaskName.SPEECH_RECOGNITION,
    )
    return await postprocessor.run(outputs)


# --- speech recognition ------------------------------------------------------------------------


async def test_ctc_collapses_repeats_drops_blanks_and_splits_words(postprocessor) -> None:
    # frame: 0     1    2    3    4      5    6    7    8    9    10     11   12
    tokens = [BLANK, "H", "H", "I", BLANK, "|", "|", "T", "H", "E", BLANK, "E", BLANK]
    second = ["|", "A", "A", "|"]
    logits = np.stack([one_hot(tokens), one_hot(second, frames=len(tokens))])

    first, other = await transcribe(postprocessor, logits, [len(tokens), len(second)])

    assert isinstance(first, Transcription)
    assert first.text == "HI THEE"  # the blank between the two Es keeps them apart
    assert [(w.word, w.start_s, w.end_s) for w in first.words] == [
        ("HI", pytest.approx(1 * FRAME_S), pytest.approx(4 * FRAME_S)),
        ("THEE", pytest.approx(7 * FRAME_S), pytest.approx(12 * FRAME_S)),
    ]
    assert isinstance(other, Transcription)
    assert other.text == "A"  # its padding frames (zeros: the blank) are cut by its length
    assert [(w.word, w.start_s, w.end_s) for w in other.words] == [
        ("A", pytest.approx(1 * FRAME_S), pytest.approx(3 * FRAME_S))
    ]


async def test_ctc_of_blanks_only_is_empty_text(postprocessor) -> None:
    (result,) = await transcribe(postprocessor, one_hot([BLANK] * 5)[None], [5])

    assert isinstance(result, Transcription)
    assert (result.text, result.words) == ("", [])


async def test_frames_default_to_the_whole_output(postprocessor) -> None:
    logits = one_hot(["O", "N", "|", "E"])[None]
    outputs = ModelOutputs(model="tiny-wav2vec2-ctc", output=logits)

    (result,) = await postprocessor.run(outputs)

    assert isinstance(result, Transcription) and result.text == "ON E"


@pytest.mark.parametrize(
    ("logits", "frames", "fragment"),
    [
        (np.zeros((1, 4, 5), np.float32), [4], "5 columns but model 'tiny-wav2vec2-ctc' has 17"),
        (np.zeros((1, 17), np.float32), [1], "[clips, frames, vocabulary]"),
        (np.zeros((1, 4, 17), np.float64), [4], "must be FP32"),
        (np.full((1, 4, 17), np.nan, np.float32), [4], "NaN"),
        (np.zeros((2, 4, 17), np.float32), [4], "expected INT32 [2] or [2, 1]"),
        (np.zeros((1, 4, 17), np.float32), [5], "in [0, 4]"),
    ],
)
async def test_ctc_outputs_that_do_not_fit_are_refused(
    postprocessor, logits, frames, fragment
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await transcribe(postprocessor, logits, frames)

    assert fragment in caught.value.message


async def test_another_task_is_refused(postprocessor) -> None:
    outputs = ModelOutputs(
        model="tiny-wav2vec2-ctc", output=np.zeros((1, 4), np.float32), task=TaskName.EMBEDDING
    )

    with pytest.raises(WrongTask, match="does speech-recognition, not embedding"):
        await postprocessor.run(outputs)


# --- audio classification ----------------------------------------------------------------------


async def test_audio_classification_is_labels_with_probabilities(postprocessor) -> None:
    logits = np.array([[0.0, 3.0, 0.0, 0.0]], dtype=np.float32)
    outputs = ModelOutputs(model="tiny-audio-classifier", output=logits, top_k=2)

    (result,) = await postprocessor.run(outputs)

    assert isinstance(result, Classification)
    assert [s.label for s in result.labels] == [AUDIO_LABELS[1], AUDIO_LABELS[0]]
    assert result.labels[0].score == pytest.approx(np.exp(3) / (np.exp(3) + 3))


# --- voice activity ----------------------------------------------------------------------------

VAD = Vad(threshold=0.5, min_silence_s=0.1)
FRAME = 0.032


def probabilities(pattern: str) -> np.ndarray:
    """'#' a speech frame (0.9), '.' silence (0.1), '=' exactly the threshold."""
    return np.array([{"#": 0.9, ".": 0.1, "=": 0.5}[c] for c in pattern], dtype=np.float32)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("....", []),
        ("####", [(0, 4)]),
        ("..##..", [(2, 4)]),
        ("..=...", [(2, 3)]),  # at the threshold is speech
        ("##..##", [(0, 6)]),  # 2 frames (0.064 s) of silence: shorter than 0.1 s, merged
        ("##....##", [(0, 2), (6, 8)]),  # 4 frames (0.128 s): two segments
        ("#.#....#...#", [(0, 3), (7, 12)]),
    ],
)
def test_speech_segments_merge_short_silences(pattern: str, expected) -> None:
    found = segments(probabilities(pattern), FRAME, VAD)

    assert found == [
        Segment(pytest.approx(s * FRAME), pytest.approx(e * FRAME)) for s, e in expected
    ]


async def test_voice_activity_results_use_the_models_threshold(postprocessor) -> None:
    rows = np.zeros((2, 6), dtype=np.float32)
    rows[0] = [0.1, 0.9, 0.9, 0.1, 0.1, 0.1]
    rows[1, :2] = [0.7, 0.7]
    outputs = ModelOutputs(model="silero-vad", output=rows, lengths=np.array([6, 2], np.int32))

    first, second = await postprocessor.run(outputs)

    assert isinstance(first, VoiceActivity) and isinstance(second, VoiceActivity)
    assert first.frame_s == pytest.approx(0.032)
    assert first.segments == [Segment(pytest.approx(0.032), pytest.approx(0.096))]
    np.testing.assert_array_equal(second.frame_probabilities, rows[1, :2])
    assert second.segments == [Segment(0.0, pytest.approx(0.064))]
