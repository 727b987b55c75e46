"""The gateway's client of the cache service's TrafficPolicies: the one boundary that sees
those calls' gRPC errors (they leave as fmserve errors)."""

from __future__ import annotations

from typing import Any

import grpc

from fmserve.errors import Unavailable, from_rpc_error
from fmserve.rpc.channels import open_channel
from fmserve.rpc.tls import Identity
from fmserve.v1 import policy_pb2, policy_pb2_grpc

CALL_TIMEOUT_S = 2.0


class PolicyStore:
    """Traffic policies with revisions, kept by the cache service. `start()` opens the channel."""

    def __init__(self, address: str, identity: Identity | None = None) -> None:
        self.address = address
        self._identity = identity
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = open_channel(self.address, identity=self._identity)
        self._stub = policy_pb2_grpc.TrafficPoliciesStub(self._channel)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

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

    async def _call(self, method: str, request: object) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    "the cache service (traffic policies) is unavailable; retry shortly"
                ) from None
            raise from_rpc_error(exc) from None
