"""The Python client: `Client` and `AsyncClient` are twins with the same methods.
It needs grpcio, protobuf and numpy only (a test keeps it so); `rich` for progress bars.

    from fmserve import Client
    with Client("localhost:50051") as c:
        vectors = c.embed(["a sentence"], model="minilm-embed")     # numpy [N, 384]
        labels = c.classify(["I love it"], model="minilm-sentiment")  # best first
        labels = c.classify_images(["photo.jpg"], model="vit-demo")     # paths, bytes, PIL images
        vectors = c.embed_images([image], model="clip")                # CLIP; zero-shot: labels=
        [t] = c.transcribe("clip.wav", model="asr-demo")  # t.text, t.words; also waveforms
        [v] = c.detect_voice(waveform, sample_rate=16_000)  # v.segments (silero-vad)

Batch jobs: submit any iterable of texts (streamed to the gateway in chunks), then wait, read:

        job = c.submit(open_texts(), model="minilm-embed")   # returns once the job is durable
        job.wait(progress=True)                              # a progress bar with rate and ETA
        for item in job.results():                           # item order, fetched page by page
            print(item.index, item.result if item.ok else item.error)

Generation (a text-generation model such as smollm2): the finished text, or a stream of it:

        g = c.generate("Write a haiku", model="smollm2", max_new_tokens=64)  # g.text, g.usage
        for event in c.stream(messages=[{"role": "user", "content": "Hi"}], model="smollm2"):
            print(getattr(event, "text", ""), end="", flush=True)  # deltas, then the Generation

A batch of prompts as a job: each item's result is its `Generation`:

        job = c.submit(prompts, model="smollm2", task="generate", max_new_tokens=32, seed=1)

A cluster with auth on needs an API key: `Client(address, api_key=key)`.

gRPC failures arrive as `fmserve.errors` exceptions (see that module's tree)."""

from fmserve.client.aio import AsyncClient, AsyncJob
from fmserve.client.sync import Client, Job
from fmserve.client.types import (
    Answer,
    ApiKey,
    Entity,
    Generation,
    GenerationDelta,
    GenerationParams,
    Guard,
    JobItem,
    JobStatus,
    LabelScore,
    ModelInfo,
    NewApiKey,
    SpeechSegment,
    TrafficPolicy,
    Transcription,
    Usage,
    VersionInfo,
    VoiceActivity,
    WordTiming,
)

__all__ = [
    "Answer",
    "ApiKey",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Entity",
    "Generation",
    "GenerationDelta",
    "GenerationParams",
    "Guard",
    "Job",
    "JobItem",
    "JobStatus",
    "LabelScore",
    "ModelInfo",
    "NewApiKey",
    "SpeechSegment",
    "TrafficPolicy",
    "Transcription",
    "Usage",
    "VersionInfo",
    "VoiceActivity",
    "WordTiming",
]
