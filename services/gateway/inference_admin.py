"""The inference service's model repository as rollouts see it: load and pin a version and
wait until it is READY (or learn why it failed), unload one, and read every version's state and
memory. KServe v2 repository RPCs (RepositoryModelLoad with the parameters `version` and `pin`,
RepositoryModelUnload with `version`, RepositoryIndex, ModelStatistics' memory_usage)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from fmserve.errors import FmserveError, NotFound
from services.gateway.stage_errors import translated
from services.gateway.stages import StageClients

CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class VersionState:
    state: str
    reason: str = ""


class InferenceAdmin:
    def __init__(self, stages: StageClients, poll_s: float = 0.2) -> None:
        self.stages = stages
        self.poll_s = poll_s

    async def load_ready(self, model: str, version: str, timeout_s: float) -> str:
        """Load and pin the version, then wait for READY: '' once it is, else why not. A model
        or version the inference service has not seen yet (its repository is polled) is asked
        again until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        refused = await self._try_load(model, version, timeout_s)
        while True:
            found = (await self.index()).get((model, version), VersionState("UNKNOWN"))
            if found.state == "READY":
                return ""
            if found.state == "FAILED":
                return found.reason or "it failed to load"
            if refused is not None and not isinstance(refused, NotFound):
                return refused.message
            if time.monotonic() > deadline:
                why = f"not READY within {timeout_s:g} s (state {found.state})"
                return refused.message if refused else why
            if refused is not None:  # not seen yet: ask again
                refused = await self._try_load(model, version, deadline - time.monotonic())
            await asyncio.sleep(self.poll_s)

    async def _try_load(self, model: str, version: str, timeout_s: float) -> FmserveError | None:
        try:
            await self._load(model, version, timeout_s)
        except FmserveError as error:
            return error
        return None

    async def unload(self, model: str, version: str) -> None:
        """Unpin the version and unload it once its requests in flight are answered."""
        request = service_pb2.RepositoryModelUnloadRequest(
            model_name=model, parameters={"version": _text(version)}
        )
        async with translated("inference"):
            await self.stages.inference_control.RepositoryModelUnload(
                request, timeout=CALL_TIMEOUT_S
            )

    async def index(self) -> dict[tuple[str, str], VersionState]:
        """Every version the inference service knows, with its state and why."""
        request = service_pb2.RepositoryIndexRequest()
        async with translated("inference"):
            reply = await self.stages.inference_control.RepositoryIndex(
                request, timeout=CALL_TIMEOUT_S
            )
        return {(m.name, m.version): VersionState(m.state, m.reason) for m in reply.models}

    async def memory(self) -> dict[tuple[str, str], int]:
        """Bytes each loaded version holds, where the inference service reports it."""
        request = service_pb2.ModelStatisticsRequest()
        async with translated("inference"):
            reply = await self.stages.inference_control.ModelStatistics(
                request, timeout=CALL_TIMEOUT_S
            )
        return {
            (s.name, s.version): sum(m.byte_size for m in s.memory_usage) for s in reply.model_stats
        }

    async def _load(self, model: str, version: str, timeout_s: float) -> None:
        request = service_pb2.RepositoryModelLoadRequest(
            model_name=model,
            parameters={
                "version": _text(version),
                "pin": service_pb2.ModelRepositoryParameter(bool_param=True),
            },
        )
        async with translated("inference"):
            await self.stages.inference_control.RepositoryModelLoad(request, timeout=timeout_s)


def _text(value: str) -> service_pb2.ModelRepositoryParameter:
    return service_pb2.ModelRepositoryParameter(string_param=value)
