"""The fmserve.v1.TrafficPolicies servicer: wire → PolicyRecords → wire. A record travels as
the TrafficPolicy the gateway built; only its revision is the store's."""

from __future__ import annotations

import grpc

from fmserve.errors import InvalidInput
from fmserve.rpc.service import Servicer
from fmserve.v1 import policy_pb2, policy_pb2_grpc
from services.cache.policies import PolicyRecord, PolicyRecords


class TrafficPoliciesServicer(policy_pb2_grpc.TrafficPoliciesServicer):
    def __init__(self, policies: PolicyRecords) -> None:
        self.policies = policies

    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        records, revision = await self.policies.all()
        return policy_pb2.ListPoliciesResponse(
            policies=[to_wire(r) for r in records], revision=revision
        )

    async def PolicyRevision(
        self, request: policy_pb2.PolicyRevisionRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyRevisionResponse:
        return policy_pb2.PolicyRevisionResponse(revision=await self.policies.revision())

    async def PutPolicy(
        self, request: policy_pb2.PutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.TrafficPolicy:
        policy = policy_pb2.TrafficPolicy()
        policy.CopyFrom(request.policy)
        if not (policy.model and policy.stable_version):
            raise InvalidInput("a traffic policy needs a model and a stable_version")
        policy.ClearField("revision")
        record = policy.SerializeToString()
        revision = await self.policies.put(policy.model, request.expected_revision, record)
        return to_wire(PolicyRecord(policy.model, record, revision))


def to_wire(record: PolicyRecord) -> policy_pb2.TrafficPolicy:
    policy = policy_pb2.TrafficPolicy.FromString(record.record)
    policy.revision = record.revision
    return policy


def servicer(policies: PolicyRecords) -> Servicer:
    """The servicer as `fmserve.rpc.service.Service` registers it."""
    name = policy_pb2.DESCRIPTOR.services_by_name["TrafficPolicies"].full_name
    return Servicer(
        policy_pb2_grpc.add_TrafficPoliciesServicer_to_server,
        TrafficPoliciesServicer(policies),
        name,
    )
