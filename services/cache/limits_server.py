"""The fmserve.v1.RateLimits servicer, hosted by the cache process beside fmserve.v1.Cache:
wire → RateLimitStore → wire (conversions in limits_codec.py)."""

from __future__ import annotations

import grpc

from fmserve.rpc.service import Servicer
from fmserve.v1 import limits_pb2, limits_pb2_grpc
from services.cache import limits_codec
from services.cache.limits import RateLimitStore


class RateLimitsServicer(limits_pb2_grpc.RateLimitsServicer):
    def __init__(self, store: RateLimitStore) -> None:
        self.store = store

    async def Admit(
        self, request: limits_pb2.AdmitRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.AdmitResponse:
        claims = [limits_codec.admission_to_domain(claim) for claim in request.claims]
        verdicts = await self.store.admit_many(claims)
        return limits_pb2.AdmitResponse(verdicts=map(limits_codec.verdict_to_wire, verdicts))

    async def Release(
        self, request: limits_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.ReleaseResponse:
        await self.store.release([(slot.key_id, slot.call_id) for slot in request.slots])
        return limits_pb2.ReleaseResponse()

    async def RenewSlots(
        self, request: limits_pb2.RenewSlotsRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.RenewSlotsResponse:
        slots = [(slot.key_id, slot.call_id) for slot in request.slots]
        await self.store.renew(slots, request.lease_ms)
        return limits_pb2.RenewSlotsResponse()

    async def Refund(
        self, request: limits_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.RefundResponse:
        await self.store.refund([(r.key_id, r.day, r.items) for r in request.refunds])
        returns = [
            (t.key_id, limits_codec.bucket_to_domain(t.bucket), t.tokens) for t in request.tokens
        ]
        await self.store.give_back(returns)
        return limits_pb2.RefundResponse()


def limits_servicer(store: RateLimitStore) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = limits_pb2.DESCRIPTOR.services_by_name["RateLimits"].full_name
    return Servicer(
        limits_pb2_grpc.add_RateLimitsServicer_to_server, RateLimitsServicer(store), name
    )
