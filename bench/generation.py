"""Benchmark: text generation with the bundled chat model (smollm2), in-process against the
inference service's ModelStreamInfer.

    python -m bench.generation [--requests 16] [--new-tokens 64]

In one run it measures
1. the baseline: `model.generate` in-process, one prompt at a time (KV cache on, greedy, 2 torch
   threads): tokens/s, per-token time after the first, and the prompt's prefill alone;
2. the inference service (its own process, 2 torch threads) through ModelStreamInfer with the
   raw gRPC stub, at concurrency 1 and 16: aggregate tokens/s, mean inter-token latency (the
   gaps between a stream's token responses), and time to first token; then concurrency 1
   again, alternating one in-process `generate` and one stream prompt by prompt, so that both
   sides of the inter-token ratio see about the same load;
3. the same at concurrency 16 with prefill one sequence per turn (`max_prefill_tokens = 1`, no
   prefix reuse: how the service prefilled before batched prefill), for the time to first token;
4. a long shared system prompt (~230 tokens) before short questions, one stream at a time and 16
   at once, with prefix reuse and without (`prefix_cache_tokens = 0`): time to first token;
and prints each figure with its ratio to the baseline of the same run (the machine is shared, so
absolute numbers drift). The variants are copies of the model's config in a temporary repository
(same weights), all loaded by one service. Prompts are chat-templated questions of about 40
tokens (SmolLM2's template adds a default system preamble); every request asks for `--new-tokens`
tokens (fewer when the model ends its answer first: tokens are counted, not assumed)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads (transformers imports it): spinning OpenMP threads slowed models 6-23x on
# this shared machine (README, "Performance"); the service sets the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fmserve.cli.cluster import free_port
from fmserve.core.repository import ModelRepository

MODEL = "smollm2"
VARIANTS = {
    "serial": "max_prefill_tokens = 1\nprefix_cache_tokens = 0\n",
    "noreuse": "prefix_cache_tokens = 0\n",
}
SYSTEM = (
    "You are Atlas, the support assistant of Northwind Cycles, a bicycle shop with three "
    "stores. Answer in a friendly, concise way, in plain English, in at most three sentences. "
    "Opening hours: Monday to Friday 9:00 to 19:00, Saturday 10:00 to 17:00, closed on Sunday. "
    "Repairs: a standard service costs 60 euros and takes two working days; a flat tyre is "
    "fixed while the customer waits, for 15 euros. Rentals: city bikes cost 20 euros a day, "
    "electric bikes 45 euros a day, with a deposit of 200 euros. Returns: unused items within "
    "30 days with the receipt. Never promise discounts; for warranty questions, ask for the "
    "order number and say a colleague will answer within one working day. If a question is "
    "not about the shop, say politely that you can only help with Northwind Cycles."
)
REPOSITORY = Path(__file__).resolve().parent.parent / "models"
QUESTIONS = [
    "Explain in detail how a bicycle works and why it stays upright.",
    "Write a long story about a lighthouse keeper who finds a message.",
    "Describe the water cycle step by step for a curious child.",
    "What are the main causes of the seasons on planet Earth?",
    "Give me a detailed plan to learn to cook simple healthy meals.",
    "Explain how computers store numbers and text in their memory.",
    "Tell me about the history of the printing press in Europe.",
    "Describe a walk through a busy market in the early morning.",
]


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def itl_ms(self) -> float:
        return statistics.fmean(self.gaps_ms)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.first_ms)


def prompts(count: int, system: str = "") -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(ModelRepository(REPOSITORY).get(MODEL).files())
    first = [{"role": "system", "content": system}] if system else []
    chats = [
        [*first, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(count)
    ]
    return [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
        for c in chats
    ]


@functools.cache
def local_model() -> Any:
    """The model in this process (2 torch threads, as the service), warmed up."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    folder = ModelRepository(REPOSITORY).get(MODEL).files()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    return model


def in_process(requests: list[list[int]], new_tokens: int) -> tuple[Run, float]:
    """`model.generate` one prompt at a time; and the median prefill of a prompt alone (ms)."""
    import torch

    model = local_model()
    run, prefills = Run(), []
    for prompt in requests:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            started = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            seconds = time.perf_counter() - started
        made = out.shape[1] - len(prompt)
        prefills.append(prefill * 1e3)
        run.tokens += made
        run.seconds += seconds
        run.first_ms.append(prefill * 1e3)
        if made > 1:  # per-token time after the first: what a stream's gaps compare with
            run.gaps_ms.append((seconds - prefill) / (made - 1) * 1e3)
    return run, statistics.median(prefills)


def request(prompt: list[int], new_tokens: int, model: str) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(prompt)])
    message.raw_input_contents.append(np.array(prompt, dtype="<i8").tobytes())
    message.parameters["max_new_tokens"].int64_param = new_tokens
    return message


async def one_stream(
    stub: object, prompt: list[int], new_tokens: int, run: Run, model: str = MODEL
) -> None:
    started = last = time.perf_counter()
    first = True
    message = request(prompt, new_tokens, model)
    call = stub.ModelStreamInfer(iter([message]))  # type: ignore[attr-defined]
    async for response in call:
        if response.error_message:
            raise RuntimeError(response.error_message)
        reply = response.infer_response
        now = time.perf_counter()
        if reply.raw_output_contents:
            count = len(reply.raw_output_contents[0]) // 8
            if first:
                run.first_ms.append((now - started) * 1e3)
                first = False
            else:
                run.gaps_ms.append((now - last) * 1e3 / count)
            run.tokens += count
            last = now


async def serve_load(
    port: int, requests: list[list[int]], new_tokens: int, c: int, model: str = MODEL
) -> Run:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await one_stream(stub, requests[0], 4, Run(), model)  # warm up
        run, pending = Run(), list(requests)

        async def worker() -> None:
            while pending:
                await one_stream(stub, pending.pop(), new_tokens, run, model)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        run.seconds = time.perf_counter() - started
        return run


async def paired(port: int, requests: list[list[int]], new_tokens: int) -> tuple[Run, Run]:
    """Concurrency 1 again, one in-process `generate` then the same prompt through the service,
    prompt after prompt: on a shared machine both then see about the same load."""
    base, served = Run(), Run()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for prompt in requests:
            base.gaps_ms += in_process([prompt], new_tokens)[0].gaps_ms
            await one_stream(stub, prompt, new_tokens, served)
    return base, served


def variants(root: Path) -> Path:
    """A repository with the model and its variants (the same source, other [generation])."""
    toml = (REPOSITORY / MODEL / "model.toml").read_text()
    for name, extra in {MODEL: "", **{f"{MODEL}-{v}": t for v, t in VARIANTS.items()}}.items():
        (root / name).mkdir()
        (root / name / "model.toml").write_text(
            toml.replace("[generation]\n", f"[generation]\n{extra}")
        )
    return root


def start_service(repository: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "FMSERVE_MODEL_REPOSITORY": str(repository),
        "FMSERVE_INFERENCE_PORT": str(port),
        "FMSERVE_INFERENCE_HOST": "127.0.0.1",
        "FMSERVE_INFERENCE_METRICS_PORT": "-1",
        "FMSERVE_INFERENCE_WORKER_ENABLED": "false",
        "FMSERVE_INFERENCE_PRELOAD": ",".join([MODEL, *(f"{MODEL}-{v}" for v in VARIANTS)]),
        "FMSERVE_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.inference"], env=env)
    return process, port


async def wait_ready(port: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                ready = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1)
                if ready.ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("the inference service did not become ready")


def report(name: str, run: Run, base: Run, prefill_ms: float) -> None:
    print(
        f"{name:<22} {run.rate:7.1f} tok/s ({run.rate / base.rate:4.2f}x)   "
        f"ITL {run.itl_ms:6.1f} ms ({run.itl_ms / base.itl_ms:4.2f}x)   "
        f"TTFT p50 {run.ttft_ms:6.1f} ms (prefill {prefill_ms:5.1f} ms, "
        f"+{run.ttft_ms - prefill_ms:5.1f} ms)"
    )


async def main(count: int, new_tokens: int) -> None:
    requests = prompts(count)
    shared = prompts(count, SYSTEM)
    print(f"{len(requests)} prompts of {statistics.fmean(map(len, requests)):.0f} tokens (mean)")
    base, prefill_ms = in_process(requests, new_tokens)
    _, shared_prefill_ms = in_process(shared, 1)
    many = requests * max(1, 32 // len(requests))
    with tempfile.TemporaryDirectory() as root:
        process, port = start_service(variants(Path(root)))
        try:
            await wait_ready(port)
            c1 = await serve_load(port, requests, new_tokens, 1)
            pair_base, pair_served = await paired(port, requests, new_tokens)
            c16 = await serve_load(port, many, new_tokens, 16)
            serial = await serve_load(port, many, new_tokens, 16, f"{MODEL}-serial")
            reuse = {
                (model, c): await serve_load(port, shared * (c // len(shared) or 1), 8, c, model)
                for model in (MODEL, f"{MODEL}-noreuse")
                for c in (1, 16)
            }
        finally:
            process.terminate()
            process.wait(timeout=30)
    report("in-process generate", base, base, prefill_ms)
    report("service c=1", c1, base, prefill_ms)
    report("service c=16", c16, base, prefill_ms)
    report("c=16 serial prefill", serial, base, prefill_ms)
    ratio = pair_served.itl_ms / pair_base.itl_ms
    print(
        f"c=1 alternating with in-process generate, prompt by prompt: ITL {pair_served.itl_ms:.1f}"
        f" ms vs {pair_base.itl_ms:.1f} ms in-process ({ratio:.2f}x)"
    )
    print(f"TTFT p50 at c=16: batched prefill {c16.ttft_ms:.0f} ms, serial {serial.ttft_ms:.0f} ms")
    print(
        f"shared system prompt: {statistics.fmean(map(len, shared)):.0f} tokens (mean), "
        f"in-process prefill {shared_prefill_ms:.1f} ms; TTFT p50, 8 new tokens each:"
    )
    for c in (1, 16):
        on, off = reuse[(MODEL, c)].ttft_ms, reuse[(f"{MODEL}-noreuse", c)].ttft_ms
        print(f"  c={c:<2}  prefix reuse {on:7.1f} ms   without {off:7.1f} ms   ({off / on:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.new_tokens))
