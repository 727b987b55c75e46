"""Audio through the real services below the gateway: clips preprocessed by the preprocess
service's featurizer, run by the inference service (called with tritonclient, as the gateway
calls it), and turned into answers by the postprocess service (its Postprocess RPC), as the
gateway will chain them. Outputs are checked against the models run in-process; the Silero VAD
against speech synthesised by espeak-ng and against silence."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import torch
import tritonclient.grpc.aio as triton
from transformers import AutoTokenizer, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from fmserve.core import tensors
from fmserve.core.repository import ModelConfig, ModelRepository
from fmserve.rpc.service import Service
from fmserve.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc
from services.postprocess.__main__ import build as build_postprocess
from services.postprocess.settings import PostprocessSettings
from services.preprocess.audio import AudioFeaturizer, AudioLimits
from tests.audio import spoken
from tests.integration.test_inference_service import start

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

LIMITS = AudioLimits(max_bytes=1 << 24, max_seconds=60.0)
SPEECH = "The quick brown fox jumps over the lazy dog. Serving models is fun."
Code = grpc.StatusCode


@pytest.fixture(scope="module")
async def inference(model_repository: Path):
    service = await start(model_repository)
    client = triton.InferenceServerClient(f"127.0.0.1:{service.port}")
    yield client
    await client.close()
    await service.stop()


@pytest.fixture(scope="module")
async def postprocess(model_repository: Path):
    settings = PostprocessSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        grace_period_s=1.0,
        model_repository=model_repository,
        worker_enabled=False,
    )
    service: Service = build_postprocess(settings)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    yield postprocess_pb2_grpc.PostprocessStub(channel)
    await channel.close()
    await service.stop()


@pytest.fixture(scope="module")
def repository(model_repository: Path) -> ModelRepository:
    return ModelRepository(model_repository)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return spoken(SPEECH, tmp_path_factory.mktemp("speech")).read_bytes()


def pcm(samples: np.ndarray, rate: int = 16_000) -> common_pb2.Media:
    return common_pb2.Media(
        mime_type="audio/pcm",
        data=samples.astype("<f4").tobytes(),
        sample_rate=rate,
        sample_format="f32le",
    )


def noise_clips() -> list[common_pb2.Media]:
    rng = np.random.default_rng(13)
    return [pcm(rng.normal(0, 0.3, n).astype(np.float32)) for n in (16_000, 9_001)]


def features_of(config: ModelConfig, media: list[common_pb2.Media]) -> dict[str, np.ndarray]:
    return AudioFeaturizer(config, config.files(config.default_version), LIMITS)(media)


async def infer(
    client: triton.InferenceServerClient, model: str, features: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    values, lengths = features["input_values"], features["lengths"]
    inputs = [InferInput("input_values", list(values.shape), "FP32")]
    inputs[0].set_data_from_numpy(values)
    inputs.append(InferInput("lengths", list(lengths.shape), "INT32"))
    inputs[1].set_data_from_numpy(lengths)
    result = await client.infer(model, inputs)
    response = result.get_response()
    return {o.name: result.as_numpy(o.name) for o in response.outputs}


async def postprocessed(
    stub: postprocess_pb2_grpc.PostprocessStub, model: str, outputs: dict[str, np.ndarray]
) -> list[common_pb2.Result]:
    main = next(name for name in outputs if name != "frames")
    request = postprocess_pb2.PostprocessRequest(model=model, output=tensors.to_wire(outputs[main]))
    if "frames" in outputs:
        request.lengths.CopyFrom(tensors.to_wire(outputs["frames"]))
    return list((await stub.Postprocess(request)).results)


def clips(features: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [row[:n] for row, n in zip(features["input_values"], features["lengths"], strict=True)]


# --- speech recognition (CTC) ------------------------------------------------------------------


async def test_ctc_logits_equal_the_model_and_decode_to_its_tokenizers_text(
    inference, postprocess, repository
) -> None:
    config = repository.get("tiny-wav2vec2-ctc")
    features = features_of(config, noise_clips())
    model = Wav2Vec2ForCTC.from_pretrained(config.files()).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.files())

    outputs = await infer(inference, "tiny-wav2vec2-ctc", features)
    results = await postprocessed(postprocess, "tiny-wav2vec2-ctc", outputs)

    logits, frames = outputs["logits"], outputs["frames"]
    assert logits.shape == (2, 799, len(tokenizer)) and frames.tolist() == [[799], [449]]
    counts = frames[:, 0]
    for row, clip, count, result in zip(logits, clips(features), counts, results, strict=True):
        with torch.inference_mode():
            alone = model(input_values=torch.from_numpy(clip)[None]).logits[0].numpy()
        assert alone.shape[0] == count
        np.testing.assert_allclose(row[:count], alone, atol=1e-4)
        assert (row[count:] == 0).all()
        text = tokenizer.decode(alone.argmax(-1).tolist())
        assert result.transcription.text == text and " " in text
        words = result.transcription.words
        assert [w.word for w in words] == text.split()
        starts = [w.start_s for w in words]
        assert starts == sorted(starts) and words[-1].end_s <= count * 20 / 16_000 + 1e-6
        assert all(w.start_s < w.end_s for w in words)


async def test_ctc_model_metadata_describes_the_audio_tensors(inference) -> None:
    metadata = await inference.get_model_metadata("tiny-wav2vec2-ctc")

    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
        ("input_values", "FP32", [-1, -1]),
        ("lengths", "INT32", [-1, 1]),
    ]
    assert [(o.name, list(o.shape)) for o in metadata.outputs] == [
        ("logits", [-1, -1, -1]),
        ("frames", [-1, 1]),
    ]


async def test_only_the_named_output_comes_back(inference, repository) -> None:
    features = features_of(repository.get("tiny-wav2vec2-ctc"), noise_clips()[:1])
    values = InferInput("input_values", list(features["input_values"].shape), "FP32")
    values.set_data_from_numpy(features["input_values"])

    result = await inference.infer(
        "tiny-wav2vec2-ctc", [values], outputs=[InferRequestedOutput("logits")]
    )

    assert [o.name for o in result.get_response().outputs] == ["logits"]


# --- audio classification ----------------------------------------------------------------------


async def test_audio_classification_equals_the_model(inference, postprocess, repository) -> None:
    config = repository.get("tiny-audio-classifier")
    features = features_of(config, noise_clips())
    model = Wav2Vec2ForSequenceClassification.from_pretrained(config.files()).eval()

    outputs = await infer(inference, "tiny-audio-classifier", features)
    results = await postprocessed(postprocess, "tiny-audio-classifier", outputs)

    assert list(outputs) == ["logits"]
    with torch.inference_mode():
        alone = [model(input_values=torch.from_numpy(c)[None]).logits[0] for c in clips(features)]
    np.testing.assert_allclose(outputs["logits"], torch.stack(alone).numpy(), atol=1e-4)
    for result, row in zip(results, alone, strict=True):
        best = result.classification.labels[0]
        assert best.label == config.labels[int(row.argmax())]
        expected = torch.softmax(row.double(), -1).max().item()
        assert best.score == pytest.approx(expected, rel=1e-5)


# --- voice activity (Silero VAD on onnxruntime) ------------------------------------------------


def speech_frames(clip: np.ndarray) -> np.ndarray:
    """Frames (512 samples) in which the synthesised voice sounds: energy within 30 dB of the
    loudest frame's."""
    frames = -(-clip.size // 512)
    padded = np.zeros(frames * 512, dtype=np.float32)
    padded[: clip.size] = clip
    rms = np.sqrt((padded.reshape(frames, 512) ** 2).mean(axis=1))
    return rms > rms.max() * 10 ** (-30 / 20)


async def test_vad_flags_espeak_speech_and_not_silence(
    inference, postprocess, repository, speech_wav
) -> None:
    config = repository.get("silero-vad")
    assert soundfile.info(io.BytesIO(speech_wav)).samplerate == 22_050  # resampled to 16 kHz
    rng = np.random.default_rng(5)
    silence = np.zeros(32_000, dtype=np.float32)
    hiss = rng.normal(0, 0.001, 48_000).astype(np.float32)
    media = [common_pb2.Media(mime_type="audio/wav", data=speech_wav), pcm(silence), pcm(hiss)]
    features = features_of(config, media)

    outputs = await infer(inference, "silero-vad", features)
    speech, quiet, noisy = await postprocessed(postprocess, "silero-vad", outputs)

    assert outputs["frames"][:, 0].tolist() == [-(-n // 512) for n in features["lengths"]]
    voiced = speech_frames(clips(features)[0])
    probabilities = np.array(speech.voice_activity.frame_probabilities)
    assert voiced.mean() > 0.5  # the clip is mostly speech, with pauses between words
    assert (probabilities[voiced] >= 0.5).mean() >= 0.8
    assert speech.voice_activity.frame_s == pytest.approx(0.032)
    assert speech.voice_activity.segments
    seconds = features["lengths"][0] / 16_000
    assert all(0 <= s.start_s < s.end_s <= seconds + 0.032 for s in speech.voice_activity.segments)
    for result in (quiet, noisy):
        assert max(result.voice_activity.frame_probabilities) < 0.5
        assert list(result.voice_activity.segments) == []


async def test_a_clip_batched_with_others_gets_what_it_gets_alone(
    inference, repository, speech_wav
) -> None:
    config = repository.get("silero-vad")
    speech = common_pb2.Media(mime_type="audio/wav", data=speech_wav)

    alone = await infer(inference, "silero-vad", features_of(config, [speech]))
    together = await infer(
        inference, "silero-vad", features_of(config, [pcm(np.zeros(5000, np.float32)), speech])
    )

    count = int(alone["frames"][0, 0])
    np.testing.assert_array_equal(together["probabilities"][1, :count], alone["probabilities"][0])


# --- refusals ------------------------------------------------------------------------------------


def values_input(array: np.ndarray) -> InferInput:
    infer_input = InferInput("input_values", list(array.shape), "FP32")
    infer_input.set_data_from_numpy(array)
    return infer_input


async def _refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        await call
    assert caught.value.status() == f"StatusCode.{Code.INVALID_ARGUMENT.name}"
    return caught.value


async def test_audio_and_text_inputs_go_to_their_own_models(inference) -> None:
    ids = InferInput("input_ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[101, 7592, 102]], dtype=np.int64))

    to_text = await _refused(
        inference.infer("tiny-classifier", [values_input(np.zeros((1, 800), np.float32))])
    )
    to_audio = await _refused(inference.infer("tiny-wav2vec2-ctc", [ids]))

    assert "takes text: send input_ids" in to_text.message()
    assert "takes audio: send input_values" in to_audio.message()


async def test_bad_samples_are_invalid_argument(inference, repository) -> None:
    nan = np.zeros((1, 800), np.float32)
    nan[0, 3] = np.nan
    too_long = np.zeros((1, repository.get("silero-vad").max_length + 1), np.float32)

    not_finite = await _refused(inference.infer("silero-vad", [values_input(nan)]))
    over = await _refused(inference.infer("silero-vad", [values_input(too_long)]))
    # shorter than the convolutions' receptive field: the model itself would crash on it
    short = await _refused(
        inference.infer("tiny-wav2vec2-ctc", [values_input(np.ones((1, 24), np.float32))])
    )

    assert "NaN or infinite" in not_finite.message()
    assert "takes at most 480256" in over.message()
    assert "a clip has 24 samples; model 'tiny-wav2vec2-ctc' needs at least 25" in short.message()


async def test_ctc_postprocess_refuses_logits_of_another_vocabulary(postprocess) -> None:
    request = postprocess_pb2.PostprocessRequest(
        model="tiny-wav2vec2-ctc", output=tensors.to_wire(np.zeros((1, 4, 9), np.float32))
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await postprocess.Postprocess(request)

    assert caught.value.code() is Code.INVALID_ARGUMENT
    assert "9 columns but model 'tiny-wav2vec2-ctc' has 17 tokens" in str(caught.value.details())
