"""The fmserve.v1.Preprocess servicer: wire → Tokenizers or Featurizers → wire (conversions in
codec.py)."""

from __future__ import annotations

import grpc

from fmserve.rpc.service import Servicer
from fmserve.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.preprocess import codec
from services.preprocess.featurizers import Featurizers
from services.preprocess.tokenizers import Tokenizers


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServicer):
    def __init__(self, tokenizers: Tokenizers, featurizers: Featurizers) -> None:
        self.tokenizers = tokenizers
        self.featurizers = featurizers

    async def Tokenize(
        self, request: preprocess_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.TokenizeResponse:
        tokenized = await self.tokenizers.tokenize(
            request.model,
            request.version,
            list(request.texts),
            truncate=request.truncate,
            offsets=request.return_offsets,
        )
        return codec.to_wire(tokenized)

    async def EncodePrompt(
        self, request: preprocess_pb2.EncodePromptRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.EncodePromptResponse:
        ids = await self.tokenizers.encode_prompt(codec.prompt_to_domain(request))
        return preprocess_pb2.EncodePromptResponse(input_ids=ids)

    async def Featurize(
        self, request: preprocess_pb2.FeaturizeRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.FeaturizeResponse:
        items = [codec.media_to_domain(m) for m in request.media]
        inputs = await self.featurizers.featurize(request.model, request.version, items)
        return codec.features_to_wire(inputs)


def servicer(tokenizers: Tokenizers, featurizers: Featurizers) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = preprocess_pb2.DESCRIPTOR.services_by_name["Preprocess"].full_name
    return Servicer(
        preprocess_pb2_grpc.add_PreprocessServicer_to_server,
        PreprocessServicer(tokenizers, featurizers),
        name,
    )
