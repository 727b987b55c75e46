"""The gateway's clients for the four stage services. This module is the one boundary that
sees their gRPC errors, and translates them into fmserve errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.core import tensors
from fmserve.core.tasks import TASK_TO_WIRE, TaskName
from fmserve.rpc import tls
from fmserve.rpc.channels import open_channel
from fmserve.rpc.tunnel_client import open_tunnel_channel
from fmserve.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from services.gateway.media import Media, media_to_wire
from services.gateway.routes import Route
from services.gateway.sampling import Prompt, Sampling
from services.gateway.settings import GatewaySettings
from services.gateway.stage_errors import translated
from services.gateway.streams import DetokenizeStream, InferenceStream, infer_request

log = logging.getLogger("fmserve.gateway.stages")

# every other task answers "logits"
OUTPUT_NAME = {
    TaskName.EMBEDDING: "embeddings",
    TaskName.IMAGE_EMBEDDING: "embeddings",
    TaskName.VOICE_ACTIVITY: "probabilities",
}
FRAMES = "frames"


@dataclass(frozen=True)
class ModelOutputs:
    """What the inference service answered for a batch."""

    main: common_pb2.Tensor
    """The model's output (embeddings, logits, probabilities)."""
    frames: common_pb2.Tensor | None = None
    """Per-frame tasks (speech recognition, voice activity): each clip's frames, INT32 [B, 1],
    which postprocess takes as its lengths."""


class StageClients:
    """Owns the channels to preprocess, inference, postprocess and cache."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._channels: list[grpc.aio.Channel] = []

    async def start(self) -> None:
        s = self.settings
        self._identity = tls.load(s)
        self._preprocess = preprocess_pb2_grpc.PreprocessStub(self._open(s.preprocess_address))
        self._postprocess = postprocess_pb2_grpc.PostprocessStub(self._open(s.postprocess_address))
        self._cache = cache_pb2_grpc.CacheStub(self._open(s.cache_address))
        # The KServe stub itself, on the gateway's own channel (request id and trace ride along):
        # tensors go out as the stages sent them, never through numpy, and a generation stream
        # is cancelled the moment its client leaves.
        self._kserve = service_pb2_grpc.GRPCInferenceServiceStub(self._open(s.inference_address))

    def _open(self, address: str) -> grpc.aio.Channel:
        """A channel to a stage; its unary calls go on the stage's tunnel (stage_streams)."""
        s = self.settings
        channel: grpc.aio.Channel
        if s.stage_streams > 0:
            channel = open_tunnel_channel(
                address, s.max_message_bytes, self._identity, s.stage_streams, s.stage_stream_age_s
            )
        else:
            channel = open_channel(address, s.max_message_bytes, self._identity)
        self._channels.append(channel)
        return channel

    @property
    def inference_control(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        """The inference service's KServe stub, for its repository RPCs (inference_admin.py)."""
        return self._kserve

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def tokenize(
        self, route: Route, texts: list[str], timeout: float
    ) -> preprocess_pb2.TokenizeResponse:
        request = preprocess_pb2.TokenizeRequest(
            model=route.model,
            version=route.version,
            texts=texts,
            truncate=route.truncate,
            return_offsets=route.task.needs_offsets,
        )
        async with translated("preprocess"):
            return await self._preprocess.Tokenize(request, timeout=timeout)

    async def featurize(
        self, route: Route, media: list[Media], timeout: float
    ) -> dict[str, common_pb2.Tensor]:
        """The media as the model's input tensors (pixel_values for images)."""
        request = preprocess_pb2.FeaturizeRequest(
            model=route.model, version=route.version, media=[media_to_wire(m) for m in media]
        )
        async with translated("preprocess"):
            reply = await self._preprocess.Featurize(request, timeout=timeout)
        return dict(reply.inputs)

    async def infer(
        self, route: Route, tokens: preprocess_pb2.TokenizeResponse, timeout: float, priority: int
    ) -> common_pb2.Tensor:
        inputs = {"input_ids": tokens.input_ids, "lengths": tokens.lengths}
        return (await self.infer_inputs(route, inputs, timeout, priority)).main

    async def embed_texts(self, route: Route, texts: list[str], timeout: float) -> np.ndarray:
        """An embedding model's raw vectors [texts, D] for texts of the gateway's own (CLIP's
        zero-shot label prompts), truncated to the model's length."""
        text_route = replace(route, truncate=True, media=False, item_bytes=0)
        tokens = await self.tokenize(text_route, texts, timeout)
        output = await self.infer(text_route, tokens, timeout, priority=0)
        return tensors.to_domain(output, "embeddings")

    async def infer_inputs(
        self, route: Route, named: dict[str, common_pb2.Tensor], timeout: float, priority: int
    ) -> ModelOutputs:
        """The model's output for its inputs by name, with each clip's frames for a per-frame
        task."""
        request = service_pb2.ModelInferRequest(model_name=route.model, model_version=route.version)
        for input_name, tensor in named.items():
            request.inputs.add(name=input_name, datatype=tensor.dtype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.data)
        names = [OUTPUT_NAME.get(route.task, "logits")]
        if route.task.per_frame:
            names.append(FRAMES)
        request.outputs.extend(
            service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names
        )
        if priority:
            request.parameters["priority"].uint64_param = priority
        async with translated("inference"):
            response = await self._kserve.ModelInfer(request, timeout=timeout)
        tensors_by_name = _outputs(response)
        frames = tensors_by_name[FRAMES] if route.task.per_frame else None
        return ModelOutputs(tensors_by_name[names[0]], frames)

    async def postprocess(
        self,
        route: Route,
        texts: list[str],
        tokens: preprocess_pb2.TokenizeResponse | None,
        output: common_pb2.Tensor,
        timeout: float,
        top_k: Sequence[int] | None = None,
        frames: common_pb2.Tensor | None = None,
    ) -> list[common_pb2.Result]:
        """One result per item (text or media). `top_k` is per item (items of one batch may
        come from requests asking different values); None: the route's for every item. Media
        send no texts nor tokens; per-frame audio outputs send each clip's `frames`."""
        top_ks = list(top_k) if top_k is not None else [route.top_k] * len(texts)
        request = postprocess_pb2.PostprocessRequest(
            model=route.model,
            version=route.version,
            task=TASK_TO_WIRE[route.task],
            output=output,
            top_k=_widest(top_ks),
        )
        if route.task.postprocess_needs_tokens and tokens is not None:
            request.texts.extend(texts)
            request.lengths.CopyFrom(tokens.lengths)
            request.offsets.CopyFrom(tokens.offsets)
        if frames is not None:
            request.lengths.CopyFrom(frames)
        async with translated("postprocess"):
            reply = await self._postprocess.Postprocess(request, timeout=timeout)
        results = list(reply.results)
        # Not strict: the batcher reports a wrong count of results, as an error for the batch.
        for result, k in zip(results, top_ks, strict=False):
            if k > 0 and result.HasField("classification"):
                del result.classification.labels[k:]
        return results

    async def encode_prompt(
        self, route: Route, prompt: Prompt, max_new_tokens: int, timeout: float
    ) -> list[int]:
        """A generation's prompt ids (chat template applied); preprocess checks the context."""
        request = preprocess_pb2.EncodePromptRequest(
            model=route.model,
            version=route.version,
            prompt=prompt.prompt,
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in prompt.messages],
            max_new_tokens=max_new_tokens,
        )
        async with translated("preprocess"):
            reply = await self._preprocess.EncodePrompt(request, timeout=timeout)
        return list(reply.input_ids)

    def generation(
        self,
        route: Route,
        input_ids: list[int],
        sampling: Sampling,
        request_id: str,
        timeout: float,
    ) -> InferenceStream:
        """The inference stream of one sequence (use with `async with`)."""
        request = infer_request(route, input_ids, sampling, request_id)
        return InferenceStream(self._kserve, request, timeout)

    def detokenizer(self, route: Route, stop: tuple[str, ...], timeout: float) -> DetokenizeStream:
        """The detokenize stream of one sequence (use with `async with`)."""
        return DetokenizeStream(self._postprocess, route, stop, timeout)

    async def lookup(self, keys: list[str], timeout: float) -> list[common_pb2.Result | None]:
        request = cache_pb2.LookupRequest(keys=keys)
        async with translated("cache"):
            reply = await self._cache.Lookup(request, timeout=timeout)
        return [entry.result if entry.found else None for entry in reply.entries]

    async def store(self, items: list[tuple[str, common_pb2.Result]], timeout: float) -> None:
        request = cache_pb2.StoreRequest(
            items=[cache_pb2.StoreItem(key=k, result=r) for k, r in items],
            ttl_s=self.settings.cache_ttl_s,
        )
        async with translated("cache"):
            await self._cache.Store(request, timeout=timeout)


def _widest(top_ks: list[int]) -> int:
    """The one top_k that serves every text: all labels (0) if one text wants them all, else
    the largest. Each text is then cut to its own: labels come best first in a stable order
    (ties keep label order), so the first k of a longer answer are what k would have given.
    One call per batch; grouping the texts by value would pay a call per distinct value."""
    return 0 if 0 in top_ks else max(top_ks, default=0)


def _outputs(response: service_pb2.ModelInferResponse) -> dict[str, common_pb2.Tensor]:
    return {
        output.name: common_pb2.Tensor(dtype=output.datatype, shape=output.shape, data=raw)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
