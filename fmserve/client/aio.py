"""The asyncio client: `AsyncClient` and its job handle `AsyncJob`, twins of the blocking ones."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from fmserve.client import media, wire
from fmserve.client.types import (
    Answer,
    ApiKey,
    Entity,
    Generation,
    GenerationDelta,
    GenerationParams,
    JobItem,
    JobStatus,
    LabelScore,
    ModelInfo,
    NewApiKey,
    TrafficPolicy,
    Transcription,
    VersionInfo,
    VoiceActivity,
)
from fmserve.errors import Unavailable, from_rpc_error
from fmserve.v1 import gateway_pb2, gateway_pb2_grpc, jobs_pb2, keys_pb2, policy_pb2


class AsyncJob:
    """A handle on a batch job of an `AsyncClient`: `Job`'s twin, every call awaited."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    async def status(self) -> JobStatus:
        request = jobs_pb2.GetJobRequest(job_id=self.id)
        return wire.to_job_status(await self.client._call("GetJob", request))

    async def wait(self, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """Wait until the job has ended; `progress=True` shows a progress bar."""
        from fmserve.client.progress import JobProgress

        request = jobs_pb2.GetJobRequest(job_id=self.id)
        status = None
        with JobProgress(enabled=progress) as bar:
            try:
                async for job in self.client._stub.WatchJob(
                    request, timeout=timeout, metadata=self.client._metadata
                ):
                    status = wire.to_job_status(job)
                    bar.update(status)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        return status or await self.status()

    async def results(self, page_size: int = wire.RESULTS_PAGE) -> AsyncIterator[JobItem]:
        """Every answered item in item order, a page at a time; waits for the job first."""
        total = (await self.wait()).total
        for start in range(0, total, page_size):
            request = jobs_pb2.GetJobResultsRequest(job_id=self.id, start=start, limit=page_size)
            for item in (await self.client._call("GetJobResults", request)).items:
                yield wire.to_job_item(item)

    async def cancel(self) -> JobStatus:
        request = jobs_pb2.CancelJobRequest(job_id=self.id)
        return wire.to_job_status(await self.client._call("CancelJob", request))


class AsyncClient:
    """asyncio client for the gateway: `Client`'s twin, every call awaited."""

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        timeout: float = 30.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        api_key: str | None = None,
    ) -> None:
        """`tls=True` verifies the gateway against the system's root certificates;
        `root_certificates` (PEM bytes, e.g. the `ca.crt` of `fmserve certs`) against those,
        and implies TLS. `api_key`: sent on every call as `authorization: Bearer <key>` (a
        cluster with auth on needs one); when not given, FMSERVE_API_KEY from the environment
        (unset or empty: no key), as the CLI does."""
        credentials = wire.credentials(tls, root_certificates)
        options = wire.channel_options()
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(address, options=options)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout
        if api_key is None:
            api_key = os.environ.get("FMSERVE_API_KEY", "")
        self._metadata = wire.auth_metadata(api_key)

    async def infer(
        self,
        texts: str | Sequence[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        cache: str = "use",
        routing_key: str = "",
    ) -> Answer:
        """Run `model` on `texts`; `cache` is "use", "bypass" or "refresh". `version` pins the
        call to that version; without it the model's traffic policy chooses, and a sticky
        policy sends the same `routing_key` (a user id, say) to the same version."""
        request = wire.infer_request(
            texts, model, task, version, truncate, top_k, cache, routing_key
        )
        try:
            return wire.to_answer(
                await self._stub.Infer(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def infer_media(
        self,
        items: media.Item | Sequence[media.Item],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        top_k: int = 0,
        cache: str = "use",
        labels: Sequence[str] = (),
        sample_rate: int = 0,
        routing_key: str = "",
    ) -> Answer:
        """Run `model` on images or audio clips: paths, encoded bytes, PIL images, or numpy
        waveforms at `sample_rate`. `labels`: zero-shot candidate labels for an
        image-embedding model (CLIP). Files are read and encoded in a worker thread, off the
        event loop."""
        request = await asyncio.to_thread(
            wire.media_request,
            items,
            model,
            task,
            version,
            top_k,
            cache,
            labels,
            sample_rate,
            routing_key,
        )
        try:
            return wire.to_answer(
                await self._stub.Infer(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def classify_images(
        self, images: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per image, its labels with scores, best first (`top_k=` keeps the best k). On an
        image-embedding model (CLIP), zero-shot against `labels=[...]` or its model.toml's."""
        answer = await self.infer_media(images, model, task="image-classification", **options)
        return answer.results

    async def embed_images(
        self, images: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> np.ndarray:
        """One L2-normalised vector per image (CLIP): a float32 array [N, dimensions]; the
        same model's `embed(texts, model)` gives its text vectors in the same space."""
        answer = await self.infer_media(images, model, task="image-embedding", **options)
        return np.stack(answer.results)

    async def classify_audio(
        self, clips: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per clip (a path, WAV/FLAC bytes, or a waveform with `sample_rate=`), its labels
        with scores, best first."""
        answer = await self.infer_media(clips, model, task="audio-classification", **options)
        return answer.results

    async def transcribe(
        self, clips: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[Transcription]:
        """Per clip, the text spoken and each word's start and end in seconds (a CTC model)."""
        answer = await self.infer_media(clips, model, task="speech-recognition", **options)
        return answer.results

    async def detect_voice(
        self, clips: media.Item | Sequence[media.Item], model: str = "silero-vad", **options: Any
    ) -> list[VoiceActivity]:
        """Per clip, the probability of speech per frame and the speech segments."""
        answer = await self.infer_media(clips, model, task="voice-activity", **options)
        return answer.results

    async def embed(
        self, texts: str | Sequence[str], model: str = "minilm-embed", **options: Any
    ) -> np.ndarray:
        """One vector per text: a float32 array [N, dimensions]."""
        return np.stack((await self.infer(texts, model, task="embedding", **options)).results)

    async def classify(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per text, its labels with scores, best first (`top_k=` keeps the best k)."""
        return (await self.infer(texts, model, task="text-classification", **options)).results

    async def entities(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[Entity]]:
        """Per text, the labelled spans found in it, with character offsets."""
        return (await self.infer(texts, model, task="token-classification", **options)).results

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        model: str,
        **parameters: Any,
    ) -> Generation:
        """Generate text and return the finished generation. Parameters as `stream`."""
        async for event in self.stream(prompt, messages=messages, model=model, **parameters):
            if isinstance(event, Generation):
                return event
        raise Unavailable("the gateway ended the stream without the generation; retry")

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        model: str,
        version: str = "",
        params: GenerationParams | None = None,
        cache: str = "use",
        timeout: float | None = None,
        routing_key: str = "",
        **sampling: Any,
    ) -> AsyncIterator[GenerationDelta | Generation]:
        """`Client.stream`'s twin: `async for` the deltas, then the `Generation`."""
        params = wire.generation_params(params, sampling)
        request = wire.generate_request(
            prompt, messages, model, version, params, cache, routing_key
        )
        call = self._stub.Generate(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for reply in call:
                yield wire.to_generation_event(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def models(self) -> list[ModelInfo]:
        try:
            reply = await self._stub.ListModels(
                gateway_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [wire.to_model_info(m) for m in reply.models]

    async def submit(
        self,
        texts: str | Iterable[str],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        truncate: bool = False,
        top_k: int = 0,
        idempotency_key: str = "",
        priority: str = "normal",
        retention_s: int = 0,
        timeout_s: int = 0,
        params: GenerationParams | None = None,
        expected_items: int | None = None,
        **sampling: Any,
    ) -> AsyncJob:
        """Submit a batch job; returns once it is durable (see `Client.submit`). `texts` may
        also be an async iterable."""
        params = wire.job_params(task, top_k, params, sampling)
        header = wire.job_header(
            model, task, version, truncate, top_k, idempotency_key, priority, retention_s,
            timeout_s, params,
        )  # fmt: skip
        header.header.expected_items = (
            wire.declared_size(texts) if expected_items is None else expected_items
        )

        async def requests() -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
            yield header
            async for request in wire.async_text_chunks(texts):
                yield request

        return await self._submit(requests())

    async def submit_media(
        self,
        items: media.Item | Iterable[media.Item],
        model: str,
        *,
        task: str | None = None,
        version: str = "",
        top_k: int = 0,
        sample_rate: int = 0,
        idempotency_key: str = "",
        priority: str = "normal",
        retention_s: int = 0,
        timeout_s: int = 0,
        expected_items: int | None = None,
    ) -> AsyncJob:
        """Submit a batch job of images or audio clips to a media model (see
        `Client.submit_media`). Items are read and encoded in worker threads, off the event
        loop: an iterator of items is advanced there too, one item at a time."""
        header = wire.job_header(
            model, task, version, False, top_k, idempotency_key, priority, retention_s, timeout_s
        )
        header.header.expected_items = (
            wire.declared_media(items) if expected_items is None else expected_items
        )

        async def requests() -> AsyncIterator[gateway_pb2.SubmitJobRequest]:
            yield header
            # Each chunk's files are read and encoded in a worker thread, off the event loop.
            chunks = wire.media_chunks(items, sample_rate)
            while (request := await asyncio.to_thread(next, chunks, None)) is not None:
                yield request

        return await self._submit(requests())

    async def _submit(self, requests: AsyncIterator[gateway_pb2.SubmitJobRequest]) -> AsyncJob:
        try:
            job = await self._stub.SubmitJob(requests, timeout=None, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return AsyncJob(self, job.id)

    async def job(self, job_id: str) -> AsyncJob:
        """A handle on a job submitted before (NOT_FOUND is raised on its first call)."""
        return AsyncJob(self, job_id)

    async def jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs, newest first."""
        reply = await self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit))
        return [wire.to_job_status(job) for job in reply.jobs]

    async def create_api_key(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        rpm: int = 0,
        max_concurrency: int = 0,
        daily_items: int = 0,
        expires_in_s: int = 0,
    ) -> NewApiKey:
        """Admin: a new API key (limits of 0: unlimited); its `api_key` is shown only here."""
        request = wire.create_key_request(
            name, scopes, rpm, max_concurrency, daily_items, expires_in_s
        )
        return wire.to_new_api_key(await self._call("CreateApiKey", request))

    async def api_keys(self) -> list[ApiKey]:
        """Admin: every API key, revoked ones included (never their secrets)."""
        reply = await self._call("ListApiKeys", keys_pb2.ListApiKeysRequest())
        return [wire.to_api_key(info) for info in reply.keys]

    async def revoke_api_key(self, name: str) -> ApiKey:
        """Admin: revoke the key of that name (every gateway refuses it within a second)."""
        return wire.to_api_key(
            await self._call("RevokeApiKey", keys_pb2.RevokeApiKeyRequest(name=name))
        )

    async def set_traffic_policy(
        self, policy: TrafficPolicy, *, timeout: float | None = None
    ) -> TrafficPolicy:
        """Admin: put a model's traffic policy in force once its canary and shadow versions
        are loaded and READY (`timeout`: seconds to wait, default the client's). A version
        that fails to load raises Conflict with the reason, and gets no traffic."""
        request = wire.policy_request(policy)
        return wire.to_traffic_policy(await self._call("SetTrafficPolicy", request, timeout))

    async def traffic_policy(self, model: str) -> TrafficPolicy:
        """Admin: a model's traffic policy (NotFound when it has none)."""
        request = policy_pb2.GetTrafficPolicyRequest(model=model)
        return wire.to_traffic_policy(await self._call("GetTrafficPolicy", request))

    async def promote(self, model: str) -> TrafficPolicy:
        """Admin: the canary becomes the stable version."""
        request = policy_pb2.PromoteRequest(model=model)
        return wire.to_traffic_policy(await self._call("Promote", request))

    async def rollback(self, model: str) -> TrafficPolicy:
        """Admin: every request back to the stable version (or, with no canary, to the
        version before the last promote) at once."""
        request = policy_pb2.RollbackRequest(model=model)
        return wire.to_traffic_policy(await self._call("Rollback", request))

    async def model_versions(self, model: str = "") -> list[VersionInfo]:
        """Admin: every version of `model` ('' all models): state, memory, traffic share,
        recent requests and errors."""
        request = policy_pb2.ListModelVersionsRequest(model=model)
        reply = await self._call("ListModelVersions", request)
        return [wire.to_version_info(row) for row in reply.versions]

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
