"""The synchronous path's work: texts (or media) through preprocess → inference → postprocess.

Concurrent requests for the same lane (model, version, task, truncation, texts or media) are
grouped by a Batcher into one call per stage, so hop costs are paid per batch; each item carries
its own request's options (top_k) through the batch. Identical items (texts, or media bytes) in
flight at once for the same route are computed once. Media go to Featurize instead of Tokenize,
in batches whose featurized tensors fit the stages' message limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from opentelemetry.context import Context

from fmserve.core import context, tracing
from fmserve.core.batching import Batcher, BatchLimits
from fmserve.errors import DeadlineExceeded, InvalidInput
from fmserve.v1 import common_pb2
from services.gateway.media import Media
from services.gateway.metrics import BATCH_SIZE, QUEUE_DELAY
from services.gateway.routes import Route
from services.gateway.settings import GatewaySettings
from services.gateway.stages import StageClients

Input = str | Media
"""A text, or a media item of a media route."""


@dataclass
class _Item:
    input: Input
    top_k: int
    """Labels its request keeps (classification; 0: all): batch mates may ask other values."""
    deadline: float
    """time.monotonic() by which the request that brought this text wants its answer."""
    request_id: str = field(default_factory=context.request_id.get)
    trace: Context = field(default_factory=tracing.current_context)
    """The trace of the request that brought this text, which its batch's span links to."""


@dataclass
class _Flight:
    """One text being computed for one route, and how many callers wait for it."""

    item: _Item
    future: asyncio.Future[common_pb2.Result]
    callers: int = 0


class Pipeline:
    """Owns one batcher per lane (`Route.lane`) and the table of texts in flight."""

    def __init__(self, stages: StageClients, settings: GatewaySettings) -> None:
        self.stages = stages
        self.limits = BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_in_flight=settings.max_batches_in_flight,
            max_queue_size=settings.max_queue_size,
        )
        self.max_media_batch_bytes = settings.max_media_batch_bytes
        self._batchers: dict[Route, Batcher[_Item, common_pb2.Result]] = {}
        """Keyed by lane: bounded by the models served, whatever options clients choose."""
        self._in_flight: dict[tuple[Route, str], _Flight] = {}

    @property
    def batchers(self) -> int:
        """How many batchers there are: one per lane (see `Route.lane`)."""
        return len(self._batchers)

    async def run(
        self, route: Route, inputs: Sequence[Input], deadline: float
    ) -> list[common_pb2.Result]:
        """One result per input, in order; raises the first input's error if any failed."""
        flights = self._join(route, inputs, deadline)
        try:
            # Not wait_for: Python 3.11's, cancelled from outside (the client went away, gRPC
            # cancelled the call at its deadline), cancels the gather and never retrieves its
            # outcome, which asyncio logs as an ERROR. Awaited here, the outcome is retrieved.
            async with asyncio.timeout(deadline - time.monotonic()):
                outcomes = await asyncio.gather(
                    *(asyncio.shield(f.future) for f in flights), return_exceptions=True
                )
        except TimeoutError:
            raise DeadlineExceeded("the deadline expired before the model answered") from None
        finally:
            for flight in flights:
                self._leave(flight)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                raise _named(outcome, index)
        return [o for o in outcomes if not isinstance(o, BaseException)]

    def _join(self, route: Route, inputs: Sequence[Input], deadline: float) -> list[_Flight]:
        """The flight computing each input for `route`: the one already under way, whose
        deadline a caller with more time left extends, or a new one. The new ones are queued
        together, so that one request's inputs share a batch."""
        keys = [_identity(i) for i in inputs]
        new: dict[str, _Item] = {}
        for key, input_ in zip(keys, inputs, strict=True):
            if flight := self._in_flight.get((route, key)):
                flight.item.deadline = max(flight.item.deadline, deadline)
            else:
                new.setdefault(key, _Item(input_, route.top_k, deadline))
        futures = self._batcher(route).enqueue(list(new.values()))
        for (key, item), future in zip(new.items(), futures, strict=True):
            self._take_off((route, key), _Flight(item, future))
        flights = [self._in_flight[(route, key)] for key in keys]
        for flight in flights:
            flight.callers += 1
        return flights

    def _take_off(self, key: tuple[Route, str], flight: _Flight) -> None:
        self._in_flight[key] = flight
        flight.future.add_done_callback(lambda _: self._landed(key, flight))

    def _leave(self, flight: _Flight) -> None:
        flight.callers -= 1
        if flight.callers == 0 and not flight.future.done():
            flight.future.cancel()  # nobody waits for it: dropped before compute if still queued

    def _landed(self, key: tuple[Route, str], flight: _Flight) -> None:
        if self._in_flight.get(key) is flight:
            del self._in_flight[key]
        if not flight.future.cancelled():
            flight.future.exception()  # retrieved, so a failure nobody awaits logs nothing

    def _batcher(self, route: Route) -> Batcher[_Item, common_pb2.Result]:
        lane = route.lane
        batcher = self._batchers.get(lane)
        if batcher is None:

            async def handler(items: list[_Item]) -> Sequence[common_pb2.Result | BaseException]:
                return await self._run_batch(lane, items)

            def observe(size: int, delays: list[float]) -> None:
                BATCH_SIZE.labels(lane.model).observe(size)
                for delay in delays:
                    QUEUE_DELAY.labels(lane.model).observe(delay)

            batcher = Batcher(handler, self._limits(lane), cost=_encoded_bytes, observer=observe)
            self._batchers[lane] = batcher
        return batcher

    def _limits(self, lane: Route) -> BatchLimits:
        """A media lane's batches hold as many items as fit max_media_batch_bytes once
        featurized (a 224x224 image is 602 KB of FP32), and as encoded (the Featurize request
        carries the bytes as sent: a few long 48 kHz WAVs outweigh their features), so that
        each hop's message fits; one item over it still goes, alone."""
        if not lane.media:
            return self.limits
        fits = lane.items_fitting(self.max_media_batch_bytes)
        return replace(
            self.limits,
            max_batch_size=min(self.limits.max_batch_size, fits),
            max_batch_cost=self.max_media_batch_bytes,
        )

    async def _run_batch(
        self, lane: Route, items: list[_Item]
    ) -> Sequence[common_pb2.Result | BaseException]:
        # A batch runs in a task of its own: it carries its first request's id and trace
        # (downstream logs and spans name it) and links to the other requests' traces.
        context.request_id.set(items[0].request_id)
        with tracing.batch_span("gateway/batch", [item.trace for item in items]) as span:
            span.set_attribute("fmserve.batch_size", len(items))
            return await self._run_items(lane, items)

    async def _run_items(
        self, lane: Route, items: list[_Item]
    ) -> Sequence[common_pb2.Result | BaseException]:
        deadline = max(item.deadline for item in items)
        try:
            return await self._through_stages(lane, items, deadline)
        except InvalidInput:
            if len(items) == 1:
                raise
        # One bad input must not fail the requests batched with it: run them one by one.
        singles = [self._through_stages(lane, [item], item.deadline) for item in items]
        outcomes = await asyncio.gather(*singles, return_exceptions=True)
        return [o if isinstance(o, BaseException) else o[0] for o in outcomes]

    async def _through_stages(
        self, lane: Route, items: list[_Item], deadline: float
    ) -> list[common_pb2.Result]:
        if lane.media:
            return await self._media_through_stages(lane, items, deadline)
        texts = [item.input for item in items if isinstance(item.input, str)]
        tokens = await self.stages.tokenize(lane, texts, _left(deadline))
        output = await self.stages.infer(lane, tokens, _left(deadline), priority=0)
        top_k = [item.top_k for item in items]
        return await self.stages.postprocess(lane, texts, tokens, output, _left(deadline), top_k)

    async def _media_through_stages(
        self, lane: Route, items: list[_Item], deadline: float
    ) -> list[common_pb2.Result]:
        media = [item.input for item in items if isinstance(item.input, Media)]
        inputs = await self.stages.featurize(lane, media, _left(deadline))
        outputs = await self.stages.infer_inputs(lane, inputs, _left(deadline), priority=0)
        top_k = [item.top_k for item in items]
        return await self.stages.postprocess(
            lane, [], None, outputs.main, _left(deadline), top_k, outputs.frames
        )

    async def start(self) -> None:
        """Nothing to start: batchers are made per lane on first use."""

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()


def _named(error: BaseException, index: int) -> BaseException:
    """An input's error naming it as its request does: preprocess named it in the batch it ran
    in, alone after a refusal ("media[0] is not a readable …"), which `index` corrects."""
    if not isinstance(error, InvalidInput):
        return error
    for kind in ("texts", "media"):
        first = f"{kind}[0]"
        # "media[0] is not a readable image/png image …", "media[0]: 1.5 s of audio; …"
        if error.message.startswith((first + " ", first + ":")):
            return type(error)(f"{kind}[{index}]" + error.message.removeprefix(first))
    return error


def _encoded_bytes(item: _Item) -> int:
    """A media item's weight in its batch: its encoded bytes (texts weigh 1, and text lanes
    set no cost limit)."""
    return len(item.input.data) if isinstance(item.input, Media) else 1


def _identity(input_: Input) -> str:
    """What makes two inputs the same work: a text itself, a media item its digest."""
    return input_ if isinstance(input_, str) else input_.digest


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the deadline expired before the model answered")
    return left
