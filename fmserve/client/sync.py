"""The blocking client: `Client` and its job handle `Job`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
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


class Job:
    """A handle on a batch job of a `Client`; every method asks the gateway afresh."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> JobStatus:
        return wire.to_job_status(
            self.client._call("GetJob", jobs_pb2.GetJobRequest(job_id=self.id))
        )

    def wait(self, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """Block until the job has ended (state and progress streamed by the gateway);
        `progress=True` shows a progress bar with rate and ETA on the terminal."""
        from fmserve.client.progress import JobProgress

        request = jobs_pb2.GetJobRequest(job_id=self.id)
        status = None
        with JobProgress(enabled=progress) as bar:
            try:
                for job in self.client._stub.WatchJob(
                    request, timeout=timeout, metadata=self.client._metadata
                ):
                    status = wire.to_job_status(job)
                    bar.update(status)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
        return status or self.status()

    def results(self, page_size: int = wire.RESULTS_PAGE) -> Iterator[JobItem]:
        """Every answered item in item order, a page at a time; waits for the job first."""
        total = self.wait().total
        for start in range(0, total, page_size):
            request = jobs_pb2.GetJobResultsRequest(job_id=self.id, start=start, limit=page_size)
            yield from map(wire.to_job_item, self.client._call("GetJobResults", request).items)

    def cancel(self) -> JobStatus:
        """Stop the job's remaining items; FAILED_PRECONDITION (Conflict) once it has ended."""
        return wire.to_job_status(
            self.client._call("CancelJob", jobs_pb2.CancelJobRequest(job_id=self.id))
        )


class Client:
    """Blocking client for the gateway."""

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
            grpc.secure_channel(address, credentials, options=options)
            if credentials
            else grpc.insecure_channel(address, options=options)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.timeout = timeout
        if api_key is None:
            api_key = os.environ.get("FMSERVE_API_KEY", "")
        self._metadata = wire.auth_metadata(api_key)

    def infer(
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
                self._stub.Infer(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def infer_media(
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
        image-embedding model (CLIP)."""
        request = wire.media_request(
            items, model, task, version, top_k, cache, labels, sample_rate, routing_key
        )
        try:
            return wire.to_answer(
                self._stub.Infer(request, timeout=self.timeout, metadata=self._metadata)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def classify_images(
        self, images: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per image, its labels with scores, best first (`top_k=` keeps the best k). On an
        image-embedding model (CLIP), zero-shot against `labels=[...]` or its model.toml's."""
        answer = self.infer_media(images, model, task="image-classification", **options)
        return answer.results

    def embed_images(
        self, images: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> np.ndarray:
        """One L2-normalised vector per image (CLIP): a float32 array [N, dimensions]; the
        same model's `embed(texts, model)` gives its text vectors in the same space."""
        answer = self.infer_media(images, model, task="image-embedding", **options)
        return np.stack(answer.results)

    def classify_audio(
        self, clips: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per clip (a path, WAV/FLAC bytes, or a waveform with `sample_rate=`), its labels
        with scores, best first."""
        answer = self.infer_media(clips, model, task="audio-classification", **options)
        return answer.results

    def transcribe(
        self, clips: media.Item | Sequence[media.Item], model: str, **options: Any
    ) -> list[Transcription]:
        """Per clip, the text spoken and each word's start and end in seconds (a CTC model)."""
        answer = self.infer_media(clips, model, task="speech-recognition", **options)
        return answer.results

    def detect_voice(
        self, clips: media.Item | Sequence[media.Item], model: str = "silero-vad", **options: Any
    ) -> list[VoiceActivity]:
        """Per clip, the probability of speech per frame and the speech segments."""
        answer = self.infer_media(clips, model, task="voice-activity", **options)
        return answer.results

    def embed(
        self, texts: str | Sequence[str], model: str = "minilm-embed", **options: Any
    ) -> np.ndarray:
        """One vector per text: a float32 array [N, dimensions]."""
        return np.stack(self.infer(texts, model, task="embedding", **options).results)

    def classify(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[LabelScore]]:
        """Per text, its labels with scores, best first (`top_k=` keeps the best k)."""
        return self.infer(texts, model, task="text-classification", **options).results

    def entities(
        self, texts: str | Sequence[str], model: str, **options: Any
    ) -> list[list[Entity]]:
        """Per text, the labelled spans found in it, with character offsets."""
        return self.infer(texts, model, task="token-classification", **options).results

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        model: str,
        **parameters: Any,
    ) -> Generation:
        """Generate text and return the finished generation. Parameters as `stream`."""
        for event in self.stream(prompt, messages=messages, model=model, **parameters):
            if isinstance(event, Generation):
                return event
        raise Unavailable("the gateway ended the stream without the generation; retry")

    def stream(
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
    ) -> Iterator[GenerationDelta | Generation]:
        """Deltas as the text is produced, then the finished `Generation`. Leaving the loop
        early cancels the generation on the server. Sampling: `params`, or its fields as
        keywords (`max_new_tokens=32, temperature=0.7, seed=1, stop=["."]`, ...: see
        `GenerationParams`); `timeout`: seconds for the whole stream (default: the client's)."""
        params = wire.generation_params(params, sampling)
        request = wire.generate_request(
            prompt, messages, model, version, params, cache, routing_key
        )
        call = self._stub.Generate(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            for reply in call:
                yield wire.to_generation_event(reply)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    def models(self) -> list[ModelInfo]:
        try:
            reply = self._stub.ListModels(
                gateway_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [wire.to_model_info(m) for m in reply.models]

    def submit(
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
    ) -> Job:
        """Submit a batch job; returns once it is durable (RabbitMQ confirmed every item).
        `texts` may be any iterable, read lazily; the same `idempotency_key` gives the same
        job; `priority` is "normal", "high" or "low"; `timeout_s` expires an unfinished job.
        `task="generate"` on a text-generation model: each text is a prompt, each item's
        result its `Generation`, sampled as `params` or keywords say (as for `stream`).
        `expected_items`: how many texts an iterator will yield (a list says so itself), so
        the gateway can refuse a job too large at once, and charge a key's daily quota."""
        params = wire.job_params(task, top_k, params, sampling)
        header = wire.job_header(
            model, task, version, truncate, top_k, idempotency_key, priority, retention_s,
            timeout_s, params,
        )  # fmt: skip
        header.header.expected_items = (
            wire.declared_size(texts) if expected_items is None else expected_items
        )
        return self._submit(itertools.chain([header], wire.text_chunks(texts)))

    def submit_media(
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
    ) -> Job:
        """Submit a batch job of images or audio clips to a media model, as `submit` submits
        texts: items as `infer_media` takes them (paths, encoded bytes, PIL images, numpy
        waveforms at `sample_rate`), any iterable, read lazily; each item's result is what
        `infer_media` would answer for it."""
        header = wire.job_header(
            model, task, version, False, top_k, idempotency_key, priority, retention_s, timeout_s
        )
        header.header.expected_items = (
            wire.declared_media(items) if expected_items is None else expected_items
        )
        return self._submit(itertools.chain([header], wire.media_chunks(items, sample_rate)))

    def _submit(self, requests: Iterator[gateway_pb2.SubmitJobRequest]) -> Job:
        try:
            job = self._stub.SubmitJob(requests, timeout=None, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return Job(self, job.id)

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted before (NOT_FOUND is raised on its first call)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs, newest first."""
        reply = self._call("ListJobs", jobs_pb2.ListJobsRequest(limit=limit))
        return [wire.to_job_status(job) for job in reply.jobs]

    def create_api_key(
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
        return wire.to_new_api_key(self._call("CreateApiKey", request))

    def api_keys(self) -> list[ApiKey]:
        """Admin: every API key, revoked ones included (never their secrets)."""
        reply = self._call("ListApiKeys", keys_pb2.ListApiKeysRequest())
        return [wire.to_api_key(info) for info in reply.keys]

    def revoke_api_key(self, name: str) -> ApiKey:
        """Admin: revoke the key of that name (every gateway refuses it within a second)."""
        return wire.to_api_key(self._call("RevokeApiKey", keys_pb2.RevokeApiKeyRequest(name=name)))

    def set_traffic_policy(
        self, policy: TrafficPolicy, *, timeout: float | None = None
    ) -> TrafficPolicy:
        """Admin: put a model's traffic policy in force once its canary and shadow versions
        are loaded and READY (`timeout`: seconds to wait, default the client's). A version
        that fails to load raises Conflict with the reason, and gets no traffic."""
        request = wire.policy_request(policy)
        return wire.to_traffic_policy(self._call("SetTrafficPolicy", request, timeout))

    def traffic_policy(self, model: str) -> TrafficPolicy:
        """Admin: a model's traffic policy (NotFound when it has none)."""
        request = policy_pb2.GetTrafficPolicyRequest(model=model)
        return wire.to_traffic_policy(self._call("GetTrafficPolicy", request))

    def promote(self, model: str) -> TrafficPolicy:
        """Admin: the canary becomes the stable version."""
        request = policy_pb2.PromoteRequest(model=model)
        return wire.to_traffic_policy(self._call("Promote", request))

    def rollback(self, model: str) -> TrafficPolicy:
        """Admin: every request back to the stable version (or, with no canary, to the
        version before the last promote) at once."""
        request = policy_pb2.RollbackRequest(model=model)
        return wire.to_traffic_policy(self._call("Rollback", request))

    def model_versions(self, model: str = "") -> list[VersionInfo]:
        """Admin: every version of `model` ('' all models): state, memory, traffic share,
        recent requests and errors."""
        request = policy_pb2.ListModelVersionsRequest(model=model)
        reply = self._call("ListModelVersions", request)
        return [wire.to_version_info(row) for row in reply.versions]

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
