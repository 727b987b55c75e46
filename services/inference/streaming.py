"""One ModelStreamInfer call: every request on it becomes a sequence of its own, and their
responses interleave on the one response stream as their tokens come. A request that fails
gets an in-stream error and the others go on. The call ends once the client has sent its last
request and every sequence has finished; when it is cancelled (or its deadline passes), every
sequence it carried is cancelled, and the scheduler frees each at its next step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from tritonclient.grpc import service_pb2

from fmserve.core import context
from fmserve.errors import FmserveError
from services.inference.codec import stream as codec
from services.inference.registry import ModelRegistry

log = logging.getLogger("fmserve.inference.streaming")


class _End:
    """Put on the response queue when the requests are read and every sequence is done."""


class StreamCall:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._replies: asyncio.Queue[
            service_pb2.ModelStreamInferResponse | _End | BaseException
        ] = asyncio.Queue()
        self._sequences: set[asyncio.Task[None]] = set()

    async def serve(
        self, requests: AsyncIterator[service_pb2.ModelInferRequest]
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while not isinstance(reply := await self._replies.get(), _End):
                if isinstance(reply, BaseException):
                    raise reply  # the request stream itself broke (an unparseable message)
                yield reply
        finally:
            await _cancel([reader, *self._sequences])

    async def _read(self, requests: AsyncIterator[service_pb2.ModelInferRequest]) -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(self._generate(request))
                self._sequences.add(task)
                task.add_done_callback(self._sequences.discard)
            while self._sequences:
                await asyncio.wait(set(self._sequences))
            self._replies.put_nowait(_End())
        except Exception as exc:
            self._replies.put_nowait(exc)

    async def _generate(self, request: service_pb2.ModelInferRequest) -> None:
        put = self._replies.put_nowait
        try:
            instance = await self.registry.generator(request.model_name, request.model_version)
            generation = codec.to_domain(request)
            async for event in instance.generate(generation):
                put(codec.to_wire(request, instance.version, event))
        except FmserveError as exc:
            put(codec.error_to_wire(request, exc))
        except Exception:
            log.exception("a generation failed")
            request_id = context.request_id.get()
            internal = FmserveError(f"internal error; the service's log has request {request_id}")
            put(codec.error_to_wire(request, internal))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
