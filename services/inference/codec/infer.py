"""ModelInfer on the wire ↔ the domain: Triton's request tensors (raw bytes or typed contents)
become per-sequence arrays (token ids, or an audio clip's samples), or per-image pixel arrays
[3, H, W]; the outputs become a response with raw_output_contents."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from tritonclient.grpc import service_pb2

from fmserve.errors import InvalidInput
from services.inference import signature
from services.inference.instance import InferOutput, InferRequest
from services.inference.ragged import Layout, split_clips, split_padded, split_ragged

_DATATYPES = {spec.name: spec.datatype for spec in (*signature.INPUTS, signature.INPUT_VALUES)} | {
    signature.PIXEL_VALUES: "FP32"
}
_NUMPY: dict[str, np.dtype] = {
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "FP32": np.dtype("<f4"),
}
_CONTENTS = {"INT64": "int64_contents", "INT32": "int_contents", "FP32": "fp32_contents"}
_FRAMES = signature.FRAMES.name
_ACCEPTED = (
    "input_ids with lengths (ragged form), input_ids with an optional attention_mask, an "
    "audio model's input_values with optional lengths, or an image model's pixel_values "
    "[B, 3, H, W]"
)


def to_domain(request: service_pb2.ModelInferRequest) -> InferRequest:
    """The sequences of a request, in its layout, with its priority and requested outputs."""
    sequences, layout = sequences_of(_tensors(request))
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        sequences=sequences,
        layout=layout,
        priority=_priority(request.parameters),
        outputs=tuple(output.name for output in request.outputs),
    )


def sequences_of(tensors: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Layout]:
    """The sequences named input tensors hold (token ids, audio clips or images), in their
    layout: a ModelInfer request's, or a queued job chunk's."""
    if signature.PIXEL_VALUES in tensors:
        return _images(tensors)
    if "input_values" in tensors:
        return _clips(tensors)
    return _token_sequences(tensors)


def _token_sequences(tensors: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Layout]:
    if "input_ids" not in tensors:
        raise InvalidInput(f"input_ids is missing; send {_ACCEPTED}")
    ids, lengths, mask = tensors["input_ids"], tensors.get("lengths"), tensors.get("attention_mask")
    if lengths is not None and mask is not None:
        raise InvalidInput("send lengths (ragged form) or attention_mask (padded form), not both")
    if lengths is not None:
        return split_ragged(ids, lengths)
    return split_padded(ids, mask)


def _clips(tensors: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Layout]:
    extra = set(tensors) - {"input_values", "lengths"}
    if extra:
        raise InvalidInput(
            f"input_values (audio) goes with lengths only, not {sorted(extra)[0]}; send {_ACCEPTED}"
        )
    return split_clips(tensors["input_values"], tensors.get("lengths")), Layout()


def _images(tensors: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Layout]:
    """One [3, H, W] array per image; the model checks H and W against its size."""
    if len(tensors) > 1:
        raise InvalidInput("send pixel_values alone: images and token ids go in separate requests")
    pixels = tensors[signature.PIXEL_VALUES]
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise InvalidInput(
            f"pixel_values: send shape [B, 3, H, W] with B >= 1; got {list(pixels.shape)}"
        )
    if not np.isfinite(pixels).all():
        raise InvalidInput("pixel_values: every value must be finite (no NaN or infinity)")
    return list(pixels), Layout()


def to_wire(
    request: service_pb2.ModelInferRequest, version: str, output: InferOutput
) -> service_pb2.ModelInferResponse:
    """A response carrying the output as little-endian FP32 raw contents, then each clip's
    frame count (INT32) after a per-frame output, unless the request named only the first."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    _add(response, output.name, "FP32", np.ascontiguousarray(output.array, dtype="<f4"))
    named = {o.name for o in request.outputs}
    if output.frames is not None and (not named or _FRAMES in named):
        _add(response, _FRAMES, "INT32", np.ascontiguousarray(output.frames, dtype="<i4"))
    return response


def _add(
    response: service_pb2.ModelInferResponse, name: str, datatype: str, array: np.ndarray
) -> None:
    response.outputs.add(name=name, datatype=datatype, shape=array.shape)
    response.raw_output_contents.append(array.tobytes())


def _tensors(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of inputs"
        )
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is sent twice")
        tensors[tensor.name] = _decode(tensor, raw[index] if raw else None)
    return tensors


def _decode(
    tensor: service_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> np.ndarray:
    datatype = _DATATYPES.get(tensor.name)
    if datatype is None:
        raise InvalidInput(f"unknown input {tensor.name!r}; send {_ACCEPTED}")
    if tensor.datatype != datatype:
        raise InvalidInput(f"{tensor.name}: datatype {tensor.datatype!r}; send {datatype}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{tensor.name}: shape {list(shape)} has a negative dimension")
    count, dtype = int(np.prod(shape)), _NUMPY[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"{tensor.name}: shape {list(shape)} needs {count * dtype.itemsize} bytes of "
                f"{datatype}, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    values = getattr(tensor.contents, _CONTENTS[datatype])
    if len(values) != count:
        raise InvalidInput(
            f"{tensor.name}: shape {list(shape)} needs {count} values, got {len(values)}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def _priority(parameters: Mapping[str, service_pb2.InferParameter]) -> int:
    """The `priority` parameter: uint64 as tritonclient sends it, or int64 from other clients."""
    if "priority" not in parameters:
        return 0
    value = parameters["priority"]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("uint64_param", "int64_param"):
        raise InvalidInput("parameter priority must be an integer (0 default, 1 highest)")
    return max(0, int(getattr(value, kind)))
