"""ModelInfer requests on the wire → domain requests, and outputs → responses: raw and typed
contents, both forms, the priority parameter, and the errors a client can act on."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from fmserve.errors import InvalidInput
from services.inference.codec import to_domain, to_wire
from services.inference.instance import InferOutput

pytestmark = pytest.mark.timeout(10)

IDS = np.array([101, 7, 102, 101, 102], dtype=np.int64)
LENGTHS = np.array([3, 2], dtype=np.int32)


def raw_request(**tensors: tuple[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="r1")
    for name, (datatype, array) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def test_raw_ragged_request() -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    infer = to_domain(request)
    assert [s.tolist() for s in infer.sequences] == [[101, 7, 102], [101, 102]]
    assert (infer.model, infer.version, infer.priority, infer.layout.mask) == ("m", "2", 0, None)


def test_typed_padded_request_with_mask() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    ids = request.inputs.add(name="input_ids", datatype="INT64", shape=[2, 3])
    ids.contents.int64_contents.extend([101, 7, 102, 101, 102, 0])
    mask = request.inputs.add(name="attention_mask", datatype="INT64", shape=[2, 3])
    mask.contents.int64_contents.extend([1, 1, 1, 1, 1, 0])
    infer = to_domain(request)
    assert [s.tolist() for s in infer.sequences] == [[101, 7, 102], [101, 102]]
    assert infer.layout.mask is not None and infer.layout.mask.shape == (2, 3)


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [("uint64_param", 1, 1), ("uint64_param", 2, 2), ("int64_param", 5, 5), (None, 0, 0)],
)
def test_priority_parameter(kind: str | None, value: int, expected: int) -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    if kind:
        setattr(request.parameters["priority"], kind, value)
    assert to_domain(request).priority == expected


def test_requested_outputs_are_kept() -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    request.outputs.add(name="logits")
    assert to_domain(request).outputs == ("logits",)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"input_ids": ("INT32", IDS.astype(np.int32))}, "datatype 'INT32'; send INT64"),
        ({"lengths": ("INT32", LENGTHS)}, "input_ids is missing"),
        ({"input_ids": ("INT64", IDS), "token_type_ids": ("INT64", IDS)}, "unknown input"),
        (
            {
                "input_ids": ("INT64", IDS.reshape(1, 5)),
                "lengths": ("INT32", np.array([5], np.int32)),
                "attention_mask": ("INT64", np.ones((1, 5), np.int64)),
            },
            "not both",
        ),
    ],
)
def test_bad_tensors_are_invalid(tensors: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        to_domain(raw_request(**tensors))


def test_raw_bytes_must_match_the_shape() -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    request.inputs[0].shape[:] = [6]
    with pytest.raises(InvalidInput, match="needs 48 bytes of INT64, got 40"):
        to_domain(request)


def test_raw_contents_must_be_one_per_input() -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    del request.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="1 entries for 2 inputs"):
        to_domain(request)


def test_response_carries_raw_fp32() -> None:
    request = raw_request(input_ids=("INT64", IDS), lengths=("INT32", LENGTHS))
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    response = to_wire(request, "2", InferOutput("logits", array))
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "r1")
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [2, 3])
    decoded = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(decoded, array)
