"""The gateway's two streams of a generation: the inference service's ModelStreamInfer (KServe
v2 / Triton decoupled streaming) and the postprocess service's Detokenize. Like stages.py, this
is a boundary: gRPC errors and in-stream `error_message`s become fmserve errors here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.errors import FmserveError, Unavailable, error_for_code, scrub_paths
from fmserve.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc
from services.gateway.routes import Route
from services.gateway.sampling import Sampling
from services.gateway.stage_errors import translated


@dataclass(frozen=True)
class Step:
    """What one inference response brought for the sequence."""

    token_ids: list[int]
    final: bool = False
    finish_reason: str = ""
    usage: common_pb2.Usage | None = None
    """On the final step only."""


class InferenceStream:
    """One sequence's ModelStreamInfer call; leaving the `async with` cancels it, which stops
    the sequence in the engine within one step."""

    def __init__(
        self,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        request: service_pb2.ModelInferRequest,
        timeout: float,
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout = timeout

    async def __aenter__(self) -> InferenceStream:
        self._call = self._stub.ModelStreamInfer(timeout=self._timeout)
        async with translated("inference"):
            await self._call.write(self._request)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._call.cancel()

    async def steps(self) -> AsyncIterator[Step]:
        """The sequence's steps, up to and including the final one."""
        while True:
            async with translated("inference"):
                message = await self._call.read()
            if message is grpc.aio.EOF:
                raise Unavailable("the inference stage ended the stream before the generation")
            step = step_to_domain(message)
            yield step
            if step.final:
                return


class DetokenizeStream:
    """One sequence's Detokenize call: token ids in, final text out (one reply per message)."""

    def __init__(
        self,
        stub: postprocess_pb2_grpc.PostprocessStub,
        route: Route,
        stop: tuple[str, ...],
        timeout: float,
    ) -> None:
        self._stub = stub
        self._timeout = timeout
        self._first: postprocess_pb2.DetokenizeRequest | None = postprocess_pb2.DetokenizeRequest(
            model=route.model, version=route.version, stop=stop
        )

    async def __aenter__(self) -> DetokenizeStream:
        self._call = self._stub.Detokenize(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._call.cancel()

    async def step(
        self, token_ids: list[int], finished: bool
    ) -> postprocess_pb2.DetokenizeResponse:
        request, self._first = self._first or postprocess_pb2.DetokenizeRequest(), None
        request.token_ids.extend(token_ids)
        request.finished = finished
        async with translated("postprocess"):
            await self._call.write(request)
            reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise Unavailable("the postprocess stage ended the stream early")
        return reply


def infer_request(
    route: Route, input_ids: list[int], sampling: Sampling, request_id: str
) -> service_pb2.ModelInferRequest:
    """The ModelStreamInfer request of one sequence (see the generation contract)."""
    request = service_pb2.ModelInferRequest(
        model_name=route.model, model_version=route.version, id=request_id
    )
    _add_input(request, "input_ids", [1, len(input_ids)], input_ids)
    if sampling.stop_token_ids:
        ids = list(sampling.stop_token_ids)
        _add_input(request, "stop_token_ids", [len(ids)], ids)
    params = request.parameters
    params["max_new_tokens"].int64_param = sampling.max_new_tokens or 0
    params["temperature"].double_param = sampling.temperature
    params["top_p"].double_param = sampling.top_p
    params["top_k"].int64_param = sampling.top_k
    params["repetition_penalty"].double_param = sampling.repetition_penalty
    if sampling.seed is not None:
        params["seed"].int64_param = sampling.seed
    return request


def _add_input(
    request: service_pb2.ModelInferRequest, name: str, shape: list[int], values: list[int]
) -> None:
    request.inputs.add(name=name, datatype="INT64", shape=shape)
    request.raw_input_contents.append(np.asarray(values, dtype="<i8").tobytes())


def step_to_domain(message: service_pb2.ModelStreamInferResponse) -> Step:
    if message.error_message:
        raise in_stream_error(message.error_message)
    response = message.infer_response
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    ids = _token_ids(response)
    if not final:
        return Step(ids)
    usage = common_pb2.Usage(
        prompt_tokens=_int(params, "prompt_tokens"),
        completion_tokens=_int(params, "completion_tokens"),
        cached_tokens=_int(params, "cached_tokens"),
    )
    reason = params["finish_reason"].string_param if "finish_reason" in params else "stop"
    return Step(ids, final=True, finish_reason=reason, usage=usage)


def _int(params: object, name: str) -> int:
    return int(params[name].int64_param) if name in params else 0  # type: ignore[index,operator]


def _token_ids(response: service_pb2.ModelInferResponse) -> list[int]:
    for i, output in enumerate(response.outputs):
        if output.name != "token_ids":
            continue
        if i < len(response.raw_output_contents):
            return np.frombuffer(response.raw_output_contents[i], dtype="<i8").tolist()
        return list(output.contents.int64_contents)
    return []


def in_stream_error(message: str) -> FmserveError:
    """An error the engine reported for this sequence: "INVALID_ARGUMENT: ..." becomes the
    error of that code, with the rest as its message."""
    name, _, rest = message.partition(":")
    code = grpc.StatusCode.__members__.get(name.strip())
    if code is None or code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return FmserveError("the inference stage failed the generation")
    return error_for_code(code, scrub_paths(rest) if rest.strip() else name)
