"""The fmserve.v1.Postprocess servicer: wire → Postprocessor → wire (conversions in codec.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from fmserve.errors import InvalidInput
from fmserve.rpc.service import Servicer
from fmserve.v1 import postprocess_pb2, postprocess_pb2_grpc
from services.postprocess import codec
from services.postprocess.detokenizer import Delta, Detokenizer
from services.postprocess.detokenizers import Detokenizers
from services.postprocess.postprocessor import Postprocessor


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, postprocessor: Postprocessor, detokenizers: Detokenizers) -> None:
        self.postprocessor = postprocessor
        self.detokenizers = detokenizers

    async def Postprocess(
        self, request: postprocess_pb2.PostprocessRequest, context: grpc.aio.ServicerContext
    ) -> postprocess_pb2.PostprocessResponse:
        results = await self.postprocessor.run(codec.to_domain(request))
        return postprocess_pb2.PostprocessResponse(results=[codec.to_wire(r) for r in results])

    async def Detokenize(
        self,
        requests: AsyncIterator[postprocess_pb2.DetokenizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.DetokenizeResponse]:
        first = await anext(aiter(requests), None)
        if first is None or not first.model:
            raise InvalidInput("the first Detokenize message must name the model")
        detokenizer = await self.detokenizers.open(first.model, first.version, first.stop)
        yield _step(detokenizer, first)
        async for request in requests:
            yield _step(detokenizer, request)


def _step(
    detokenizer: Detokenizer, request: postprocess_pb2.DetokenizeRequest
) -> postprocess_pb2.DetokenizeResponse:
    """One reply per message: the text its tokens (and, when finished, the end) made final."""
    delta = detokenizer.add(request.token_ids)
    if request.finished:
        end = detokenizer.finish()
        delta = Delta(delta.text + end.text, end.stopped)
    return postprocess_pb2.DetokenizeResponse(text=delta.text, stopped=delta.stopped)


def servicer(postprocessor: Postprocessor, detokenizers: Detokenizers) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name
    return Servicer(
        postprocess_pb2_grpc.add_PostprocessServicer_to_server,
        PostprocessServicer(postprocessor, detokenizers),
        name,
    )
