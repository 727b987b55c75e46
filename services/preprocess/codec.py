"""The preprocess service's wire ↔ domain conversions, named for their direction as in every
service. A Tokenize request's fields are plain values the servicer passes on, so only its reply
needs converting; an EncodePrompt request becomes a `PromptRequest`."""

from __future__ import annotations

import numpy as np

from fmserve.core import tensors
from fmserve.v1 import common_pb2, preprocess_pb2
from services.preprocess.hf_tokenizer import Tokenized
from services.preprocess.media import MediaItem
from services.preprocess.prompts import ChatMessage, PromptRequest


def prompt_to_domain(request: preprocess_pb2.EncodePromptRequest) -> PromptRequest:
    return PromptRequest(
        model=request.model,
        version=request.version,
        prompt=request.prompt,
        messages=[ChatMessage(m.role, m.content) for m in request.messages],
        max_new_tokens=request.max_new_tokens,
    )


def to_wire(tokenized: Tokenized) -> preprocess_pb2.TokenizeResponse:
    reply = preprocess_pb2.TokenizeResponse(
        input_ids=tensors.to_wire(tokenized.input_ids),
        lengths=tensors.to_wire(tokenized.lengths),
    )
    if tokenized.offsets is not None:
        reply.offsets.CopyFrom(tensors.to_wire(tokenized.offsets))
    return reply


def media_to_domain(media: common_pb2.Media) -> MediaItem:
    return MediaItem(
        mime_type=media.mime_type,
        data=media.data,
        sample_rate=media.sample_rate,
        channels=media.channels,
        sample_format=media.sample_format,
    )


def features_to_wire(inputs: dict[str, np.ndarray]) -> preprocess_pb2.FeaturizeResponse:
    return preprocess_pb2.FeaturizeResponse(
        inputs={name: tensors.to_wire(array) for name, array in inputs.items()}
    )
