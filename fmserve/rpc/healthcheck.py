"""`python -m fmserve.rpc.healthcheck ADDRESS [SERVICE]`: exit 0 when the gRPC health service at
ADDRESS says SERVING, 1 otherwise. Container health checks run it (deploy/compose/), so it
imports nothing heavy and waits at most `--timeout-s`."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name (SERVING, NOT_SERVING, …), or why it could not be asked."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmserve.rpc.healthcheck", description=__doc__)
    parser.add_argument("address", help="host:port of any fmserve service")
    parser.add_argument("service", nargs="?", default="", help="one service name; '' = whole")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    answer = status(args.address, args.service, args.timeout_s)
    print(f"{args.address}: {answer}")
    return 0 if answer == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
