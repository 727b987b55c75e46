"""The gateway's client of the cache service's TrafficPolicies."""

from __future__ import annotations

import grpc

from fmserve.v1 import policy_pb2, policy_pb2_grpc
from services.gateway.cache_service import CacheServiceClient


class PolicyStore(CacheServiceClient):
    """Traffic policies with revisions, kept by the cache service."""

    unavailable = "the cache service (traffic policies) is unavailable; retry shortly"

    def stub(self, channel: grpc.aio.Channel) -> policy_pb2_grpc.TrafficPoliciesStub:
        return policy_pb2_grpc.TrafficPoliciesStub(channel)

    async def revision(self) -> int:
        reply = await self._call("PolicyRevision", policy_pb2.PolicyRevisionRequest())
        return int(reply.revision)

    async def all(self) -> policy_pb2.ListPoliciesResponse:
        return await self._call("ListPolicies", policy_pb2.ListPoliciesRequest())

    async def put(
        self, policy: policy_pb2.TrafficPolicy, expected_revision: int
    ) -> policy_pb2.TrafficPolicy:
        """Conflict when the model's policy is no longer at `expected_revision`."""
        request = policy_pb2.PutPolicyRequest(policy=policy, expected_revision=expected_revision)
        return await self._call("PutPolicy", request)
