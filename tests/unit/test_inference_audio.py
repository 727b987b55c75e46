"""The inference service's audio pieces without a server: the clips form of requests, per-frame
outputs joined with their frame counts, the frames a clip gives (against transformers' own
count), the Silero VAD's framing, and how audio models describe themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC
from tritonclient.grpc import service_pb2

from fmserve.core.repository import ModelRepository
from fmserve.errors import InvalidInput
from services.inference import codec
from services.inference.audio_runner import AudioRunner
from services.inference.instance import InferOutput
from services.inference.ragged import join_frames, split_clips
from services.inference.vad_backend import framed
from tests.models import build_ctc

pytestmark = pytest.mark.timeout(30)


def test_clips_are_rows_cut_to_their_lengths() -> None:
    values = np.arange(12, dtype=np.float32).reshape(2, 6)

    clips = split_clips(values, np.array([[6], [2]], dtype=np.int32))

    assert [clip.tolist() for clip in clips] == [list(range(6)), [6.0, 7.0]]
    assert [clip.size for clip in split_clips(values, None)] == [6, 6]


@pytest.mark.parametrize(
    ("shape", "lengths", "fragment"),
    [
        ((6,), None, "send shape [clips, samples]"),
        ((0, 6), None, "holds no sequences"),
        ((2, 6), [6], "one sample count per clip: [2]"),
        ((2, 6), [6, 0], "every clip needs 1 to 6 samples"),
        ((2, 6), [6, 7], "every clip needs 1 to 6 samples"),
    ],
)
def test_bad_clip_layouts_are_refused(shape, lengths, fragment) -> None:
    array = None if lengths is None else np.array(lengths, dtype=np.int32)
    with pytest.raises(InvalidInput) as caught:
        split_clips(np.zeros(shape, dtype=np.float32), array)
    assert fragment in caught.value.message


def test_per_frame_outputs_are_padded_with_their_frame_counts() -> None:
    joined, frames = join_frames([np.ones((3, 2)), np.ones((1, 2))])

    assert joined.shape == (2, 3, 2) and frames.dtype == np.int32
    assert frames.tolist() == [[3], [1]]
    assert joined[1, 1:].sum() == 0


def test_a_request_of_input_values_becomes_clips() -> None:
    values = np.zeros((2, 5), dtype="<f4")
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="input_values", datatype="FP32", shape=[2, 5])
    request.inputs.add(name="lengths", datatype="INT32", shape=[2])
    request.raw_input_contents.extend([values.tobytes(), np.array([5, 3], "<i4").tobytes()])

    infer = codec.to_domain(request)

    assert [clip.size for clip in infer.sequences] == [5, 3]
    assert infer.sequences[0].dtype == np.float32


def test_input_values_do_not_mix_with_token_inputs() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="input_values", datatype="FP32", shape=[1, 1])
    request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.extend([b"\0" * 4, b"\0" * 8])

    with pytest.raises(InvalidInput, match="goes with lengths only, not attention_mask"):
        codec.to_domain(request)


def test_a_per_frame_output_goes_out_with_its_frames() -> None:
    request = service_pb2.ModelInferRequest(model_name="m", id="7")
    output = InferOutput("logits", np.zeros((2, 3, 4)), np.array([[3], [1]]))

    response = codec.to_wire(request, "1", output)

    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("logits", "FP32", [2, 3, 4]),
        ("frames", "INT32", [2, 1]),
    ]
    assert np.frombuffer(response.raw_output_contents[1], "<i4").tolist() == [3, 1]


def test_ctc_frames_per_clip_are_transformers_own(model_repository: Path) -> None:
    config = ModelRepository(model_repository).get("tiny-wav2vec2-ctc")
    runner = AudioRunner.load(config, "1")
    model = Wav2Vec2ForCTC.from_pretrained(config.files("1"))
    samples = [20, 29, 30, 400, 16_000, 16_019]

    ours = [runner.framing.frames(n) for n in samples]

    assert ours == model._get_feat_extract_output_lengths(torch.tensor(samples)).tolist()
    assert runner.cost(np.zeros(16_000, np.float32)) == 800  # 20 samples per frame
    assert runner.framing.min_samples == 25
    assert (runner.framing.frames(25), runner.framing.frames(24)) == (1, 0)


def test_a_model_without_attention_mask_runs_each_clip_unpadded(tmp_path: Path) -> None:
    build_ctc(tmp_path / "asr" / "1", seed=8, layer_norm=False)
    (tmp_path / "asr" / "model.toml").write_text('task = "speech-recognition"\n')
    config = ModelRepository(tmp_path).get("asr")
    runner = AudioRunner.load(config, "1")
    model = Wav2Vec2ForCTC.from_pretrained(config.files("1")).eval()
    rng = np.random.default_rng(1)
    clips = [rng.normal(0, 1, n).astype(np.float32) for n in (4000, 1500)]

    outputs = runner.forward(clips).outputs

    with torch.inference_mode():
        alone = [model(input_values=torch.from_numpy(c)[None]).logits[0].numpy() for c in clips]
        padded_short = model(input_values=torch.from_numpy(np.pad(clips[1], (0, 2500)))[None])
    for ours, theirs in zip(outputs, alone, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # what batching with padding would have given: another answer
    assert not np.allclose(padded_short.logits[0, : len(alone[1])].numpy(), alone[1], atol=1e-3)


def test_vad_frames_carry_the_previous_frames_last_64_samples() -> None:
    samples = np.arange(1, 1201, dtype=np.float32)[None]  # 2 frames and a part of a third

    frames = framed(samples)

    assert frames.shape == (1, 3, 576)
    assert (frames[0, 0, :64] == 0).all() and frames[0, 0, 64:].tolist() == list(range(1, 513))
    assert frames[0, 1, :64].tolist() == list(range(449, 513))
    assert frames[0, 2, 64:240].tolist() == list(range(1025, 1201))
    assert (frames[0, 2, 240:] == 0).all()


@pytest.mark.parametrize(
    ("model", "outputs"),
    [
        ("tiny-wav2vec2-ctc", [("logits", "FP32", [-1, -1, -1]), ("frames", "INT32", [-1, 1])]),
        ("tiny-audio-classifier", [("logits", "FP32", [-1, 4])]),
        ("silero-vad", [("probabilities", "FP32", [-1, -1]), ("frames", "INT32", [-1, 1])]),
    ],
)
def test_audio_models_describe_their_tensors(model_repository: Path, model, outputs) -> None:
    config = ModelRepository(model_repository).get(model)

    metadata = codec.metadata_to_wire(config, config.default_version)
    model_config = codec.config_to_wire(config, config.default_version).config

    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
        ("input_values", "FP32", [-1, -1]),
        ("lengths", "INT32", [-1, 1]),
    ]
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == outputs
    assert [i.name for i in model_config.input] == ["input_values", "lengths"]
    assert [o.name for o in model_config.output] == [name for name, _, _ in outputs]
