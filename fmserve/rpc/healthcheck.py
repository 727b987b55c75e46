"""`python -m fmserve.rpc.healthcheck ADDRESS [SERVICE]`: exit 0 when the gRPC health service at
ADDRESS says SERVING, 1 otherwise. Container health checks run it (deploy/compose/), so it
imports nothing heavy (no settings: the certificate files come as arguments) and waits at most
`--timeout-s`. With `--tls-cert/--tls-key/--tls-ca` it presents that certificate, as a service
with mTLS on requires of every client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fmserve.rpc import tls


def status(
    address: str, service: str = "", timeout_s: float = 2.0, identity: tls.Identity | None = None
) -> str:
    """The health status name (SERVING, NOT_SERVING, …), or why it could not be asked."""
    with _channel(address, identity) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _channel(address: str, identity: tls.Identity | None) -> grpc.Channel:
    if identity is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, identity.channel_credentials())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmserve.rpc.healthcheck", description=__doc__)
    parser.add_argument("address", help="host:port of any fmserve service")
    parser.add_argument("service", nargs="?", default="", help="one service name; '' = whole")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--tls-cert", type=Path, help="certificate to present (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="its private key")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate the server's is checked with")
    args = parser.parse_args(argv)
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(given) and not all(given):
        parser.error("--tls-cert, --tls-key and --tls-ca go together")
    identity = tls.from_files(args.tls_ca, args.tls_cert, args.tls_key) if all(given) else None
    answer = status(args.address, args.service, args.timeout_s, identity)
    print(f"{args.address}: {answer}")
    return 0 if answer == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
