"""ModelStreamInfer for text generation on the wire ↔ the domain, as Triton's decoupled models
speak it: a request carries `input_ids` (INT64, [1, N] or [N]), an optional `stop_token_ids`
(INT64 [K]) and sampling parameters; each step's tokens go back as `token_ids` (INT64 [1, k])
with `triton_final_response` false, and the last response is marked final and carries the
finish reason and the token counts. A request's error is an in-stream `error_message` that
starts with the gRPC status name ("INVALID_ARGUMENT: ..."), and the stream goes on."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from tritonclient.grpc import service_pb2

from fmserve.errors import FmserveError, InvalidInput
from services.inference.generation.params import GenerationRequest, Sampling
from services.inference.generation.scheduler import Event, Finished

INPUTS = ("input_ids", "stop_token_ids")
FLOAT_PARAMETERS = ("temperature", "top_p", "repetition_penalty")
INT_PARAMETERS = ("max_new_tokens", "top_k", "seed")
# Triton's reserved request parameters, which tritonclient may send: accepted and not used.
RESERVED = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")


def to_domain(request: service_pb2.ModelInferRequest) -> GenerationRequest:
    """The generation a request asks for; InvalidInput names the field that is wrong."""
    tensors = _tensors(request)
    if "input_ids" not in tensors:
        raise InvalidInput("input_ids is missing: send the prompt's token ids, INT64 [1, N]")
    prompt = tensors["input_ids"]
    if prompt.ndim == 2 and prompt.shape[0] != 1:
        raise InvalidInput(
            f"input_ids has {prompt.shape[0]} rows: send one prompt per request, [1, N] or [N]"
        )
    params = _parameters(request.parameters)
    stop = tensors.get("stop_token_ids", np.zeros(0, dtype=np.int64))
    return GenerationRequest(
        prompt_ids=tuple(int(i) for i in prompt.reshape(-1)),
        max_new_tokens=_int(params, "max_new_tokens"),
        sampling=Sampling(
            temperature=_float(params, "temperature", 0.0),
            top_p=_float(params, "top_p", 1.0),
            top_k=_int(params, "top_k") or 0,
            repetition_penalty=_float(params, "repetition_penalty", 1.0),
            seed=_int(params, "seed"),
        ),
        stop_token_ids=frozenset(int(i) for i in stop.reshape(-1)),
    )


def to_wire(
    request: service_pb2.ModelInferRequest, version: str, event: Event
) -> service_pb2.ModelStreamInferResponse:
    """One step's tokens, or the final response with the finish reason and usage."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    final = isinstance(event, Finished)
    response.parameters["triton_final_response"].bool_param = final
    if isinstance(event, Finished):
        response.parameters["finish_reason"].string_param = event.reason
        response.parameters["prompt_tokens"].int64_param = event.prompt_tokens
        response.parameters["completion_tokens"].int64_param = event.completion_tokens
        response.parameters["cached_tokens"].int64_param = event.cached_tokens
    else:
        ids = np.asarray(event.ids, dtype="<i8").reshape(1, -1)
        response.outputs.add(name="token_ids", datatype="INT64", shape=ids.shape)
        response.raw_output_contents.append(ids.tobytes())
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def error_to_wire(
    request: service_pb2.ModelInferRequest | None, error: FmserveError
) -> service_pb2.ModelStreamInferResponse:
    """A request's error, named by status, carrying the request's id so a client can tell whose."""
    response = service_pb2.ModelStreamInferResponse(
        error_message=f"{error.code.name}: {error.message}"
    )
    if request is not None:
        response.infer_response.id = request.id
        response.infer_response.model_name = request.model_name
    return response


def _tensors(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of inputs"
        )
    tensors = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise InvalidInput(f"unknown input {tensor.name!r}; a generation takes {INPUTS}")
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is sent twice")
        tensors[tensor.name] = _int64(tensor, raw[index] if raw else None)
    return tensors


def _int64(tensor: service_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, shape = tensor.name, tuple(tensor.shape)
    if tensor.datatype != "INT64":
        raise InvalidInput(f"{name}: datatype {tensor.datatype!r}; send INT64")
    if len(shape) not in (1, 2):
        raise InvalidInput(f"{name}: shape {list(shape)}; send [1, N] or [N]")
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * 8:
            raise InvalidInput(
                f"{name}: shape {list(shape)} needs {count * 8} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype="<i8").reshape(shape)
    values = tensor.contents.int64_contents
    if len(values) != count:
        raise InvalidInput(f"{name}: shape {list(shape)} needs {count} values, got {len(values)}")
    return np.asarray(values, dtype=np.int64).reshape(shape)


def _parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> dict[str, float | int]:
    known = (*FLOAT_PARAMETERS, *INT_PARAMETERS)
    values: dict[str, float | int] = {}
    for name, parameter in parameters.items():
        if name in RESERVED or name.startswith("triton_"):
            continue
        if name not in known:
            raise InvalidInput(f"unknown parameter {name!r}; a generation takes {known}")
        kind = parameter.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param", "double_param"):
            raise InvalidInput(f"parameter {name} must be a number, got a {kind}")
        values[name] = getattr(parameter, kind)
    return values


def _float(params: dict[str, float | int], name: str, default: float) -> float:
    return float(params.get(name, default))


def _int(params: dict[str, float | int], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise InvalidInput(f"{name} must be an integer, got {value:g}")
    return int(value)
