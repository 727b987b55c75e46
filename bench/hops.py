"""Benchmark: what one hop between two services costs in grpc.aio, the transport every fmserve
service speaks, as a unary call (what a client makes to the gateway, and the gateway to a
stage that does not serve the tunnel) and as one message each way on a bidirectional stream
kept open (how the gateway's calls reach the stages: fmserve/rpc/tunnel_*.py).

    python -m bench.hops            (also in `make bench`)

A server in a process of its own echoes 200 bytes; this process calls it at concurrency 1,
the two forms taking turns round by round, and prints each form's wall time per round trip
and the CPU both processes spent on it. The handler does nothing, so every microsecond is the
hop's own: serialisation, HTTP/2 framing, gRPC's poller thread waking the event loop."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from bench.budget import cpu_seconds

SERVICE = "fmserve.bench.Echo"
PAYLOAD = b"x" * 200


def _serve(ports: multiprocessing.Queue[int]) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def serve() -> None:
        server = grpc.aio.server()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def _measure(
    port: int, server_pid: int, rounds: int, calls: int
) -> dict[str, list[tuple[float, float]]]:
    """Per form, per round: (wall µs, CPU µs of both processes) per round trip."""
    figures: dict[str, list[tuple[float, float]]] = {"unary call": [], "message on a stream": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        stream = channel.stream_stream(f"/{SERVICE}/Stream")()

        async def on_stream() -> object:
            await stream.write(PAYLOAD)
            return await stream.read()

        forms: dict[str, Callable[[], Awaitable[object]]] = {
            "unary call": lambda: unary(PAYLOAD, timeout=10),
            "message on a stream": on_stream,
        }
        for round_ in range(rounds):
            for name in forms if round_ % 2 == 0 else reversed(forms):
                trip = forms[name]
                for _ in range(calls // 10):  # warm
                    await trip()
                cpu, server, started = (
                    time.process_time(),
                    cpu_seconds(server_pid),
                    time.perf_counter(),
                )
                for _ in range(calls):
                    await trip()
                wall = time.perf_counter() - started
                spent = time.process_time() - cpu + cpu_seconds(server_pid) - server
                figures[name].append((wall / calls * 1e6, spent / calls * 1e6))
        await stream.done_writing()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000, help="round trips per form and round")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = spawn.Queue()
    server = spawn.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    try:
        assert server.pid is not None
        figures = asyncio.run(_measure(ports.get(timeout=60), server.pid, args.rounds, args.calls))
    finally:
        server.kill()
        server.join()
    unary_wall = statistics.median(w for w, _ in figures["unary call"])
    for name, rounds in figures.items():
        wall = statistics.median(w for w, _ in rounds)
        cpu = statistics.median(c for _, c in rounds)
        print(
            f"{name:<20} {wall:6.0f} us a round trip ({wall / unary_wall:.2f}x the unary call), "
            f"{cpu:6.0f} us of CPU (client + server)"
        )


if __name__ == "__main__":
    main()
