"""The fmserve.v1.Preprocess servicer: wire → Tokenizers → wire."""

from __future__ import annotations

import grpc

from fmserve.core import tensors
from fmserve.rpc.service import Servicer
from fmserve.v1 import preprocess_pb2, preprocess_pb2_grpc
from services.preprocess.hf_tokenizer import Tokenized
from services.preprocess.tokenizers import Tokenizers


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServicer):
    def __init__(self, tokenizers: Tokenizers) -> None:
        self.tokenizers = tokenizers

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
        return to_wire(tokenized)


def servicer(tokenizers: Tokenizers) -> Servicer:
    name = preprocess_pb2.DESCRIPTOR.services_by_name["Preprocess"].full_name
    return Servicer(
        preprocess_pb2_grpc.add_PreprocessServicer_to_server, PreprocessServicer(tokenizers), name
    )


def to_wire(tokenized: Tokenized) -> preprocess_pb2.TokenizeResponse:
    reply = preprocess_pb2.TokenizeResponse(
        input_ids=tensors.to_wire(tokenized.input_ids),
        lengths=tensors.to_wire(tokenized.lengths),
    )
    if tokenized.offsets is not None:
        reply.offsets.CopyFrom(tensors.to_wire(tokenized.offsets))
    return reply
