"""The preprocess service's wire ↔ domain conversions, named for their direction as in every
service. A Tokenize request's fields are plain values the servicer passes on, so only the reply
needs converting."""

from __future__ import annotations

from fmserve.core import tensors
from fmserve.v1 import preprocess_pb2
from services.preprocess.hf_tokenizer import Tokenized


def to_wire(tokenized: Tokenized) -> preprocess_pb2.TokenizeResponse:
    reply = preprocess_pb2.TokenizeResponse(
        input_ids=tensors.to_wire(tokenized.input_ids),
        lengths=tensors.to_wire(tokenized.lengths),
    )
    if tokenized.offsets is not None:
        reply.offsets.CopyFrom(tensors.to_wire(tokenized.offsets))
    return reply
