"""The fmserve.v1.Postprocess servicer: wire → Postprocessor → wire (conversions in codec.py)."""

from __future__ import annotations

import grpc

from fmserve.rpc.service import Servicer
from fmserve.v1 import postprocess_pb2, postprocess_pb2_grpc
from services.postprocess import codec
from services.postprocess.postprocessor import Postprocessor


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServicer):
    def __init__(self, postprocessor: Postprocessor) -> None:
        self.postprocessor = postprocessor

    async def Postprocess(
        self, request: postprocess_pb2.PostprocessRequest, context: grpc.aio.ServicerContext
    ) -> postprocess_pb2.PostprocessResponse:
        results = await self.postprocessor.run(codec.to_domain(request))
        return postprocess_pb2.PostprocessResponse(results=[codec.to_wire(r) for r in results])


def servicer(postprocessor: Postprocessor) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = postprocess_pb2.DESCRIPTOR.services_by_name["Postprocess"].full_name
    return Servicer(
        postprocess_pb2_grpc.add_PostprocessServicer_to_server,
        PostprocessServicer(postprocessor),
        name,
    )
