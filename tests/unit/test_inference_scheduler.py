"""The generation scheduler (services/inference/generation/scheduler.py) with a real tiny Llama
in-process: sequences that join mid-way, one whose sampling crashes failing alone, admission in
arrival order under the budget, and cancellation freeing the rows."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from fmserve.errors import FmserveError, Unavailable
from services.inference.generation.budget import KvBudget
from services.inference.generation.engine import Engine, Prefilled, Prompt
from services.inference.generation.params import Checked, Sampling
from services.inference.generation.scheduler import Finished, Scheduler, Sequence, Tokens
from services.inference.loading import Placement
from services.inference.stats import ModelStats
from tests.models import build_causal_lm

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = build_causal_lm(tmp_path_factory.mktemp("lm") / "1", "llama", seed=5)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


class CrashingSampler(Scheduler):
    """A seam: sampling raises for prompts that start with token 13."""

    def _sample(self, sequence: Sequence, logits: torch.Tensor) -> int:
        if sequence.request.prompt_ids[0] == 13 and sequence.generated:
            raise RuntimeError("sampling bug")
        return super()._sample(sequence, logits)


class CountingEngine(Engine):
    """Records the rows of each prefill pass."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module, Placement(torch.device("cpu"), torch.float32))
        self.prefills: list[int] = []

    def prefill(self, prompts: list[Prompt]) -> Prefilled:
        self.prefills.append(len(prompts))
        return super().prefill(prompts)


def scheduler(
    model: torch.nn.Module,
    budget: KvBudget,
    cls: type[Scheduler] = Scheduler,
    **options: int,
) -> Scheduler:
    engine = CountingEngine(model)
    return cls(
        engine,
        "lm",
        context=256,
        eos_ids=frozenset(),
        budget=budget,
        max_wait_s=5.0,
        executor=ThreadPoolExecutor(1),
        stats=ModelStats(),
        **options,
    )


def checked(prompt: list[int], new: int) -> Checked:
    return Checked(tuple(prompt), new, Sampling(), frozenset())


async def run(s: Scheduler, prompt: list[int], new: int) -> list[int] | FmserveError:
    tokens: list[int] = []
    try:
        async for event in s.generate(checked(prompt, new)):
            if isinstance(event, Tokens):
                tokens += event.ids
            else:
                assert isinstance(event, Finished) and event.completion_tokens == len(tokens)
    except FmserveError as exc:
        return exc
    return tokens


def reference(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


async def test_a_crash_in_one_sequences_sampling_fails_it_alone(model: torch.nn.Module) -> None:
    s = scheduler(model, KvBudget(4096, 8), CrashingSampler)
    s.start()
    good, bad = [5, 6, 7, 8], [13, 14, 15]
    results = await asyncio.gather(run(s, good, 20), run(s, bad, 20), run(s, good[:2], 9))
    await s.stop()
    assert results[0] == reference(model, good, 20)
    assert isinstance(results[1], Unavailable) and "sampling" in results[1].message
    assert results[2] == reference(model, good[:2], 9)
    assert s.active == 0 and s.budget.tokens == 0


async def test_admission_follows_arrival_under_the_budget(model: torch.nn.Module) -> None:
    s = scheduler(model, KvBudget(max_tokens=40, max_sequences=8))
    s.start()
    order: list[int] = []

    async def tagged(tag: int, prompt: list[int], new: int) -> None:
        async for event in s.generate(checked(prompt, new)):
            if isinstance(event, Tokens) and tag not in order:
                order.append(tag)

    # 30 + 10 fills the budget; the second (30) must wait; the third (5) fits beside the first
    # by tokens but arrives after the second, so it waits behind it
    await asyncio.gather(tagged(0, [5] * 20, 10), tagged(1, [6] * 20, 10), tagged(2, [7] * 2, 3))
    await s.stop()
    assert order == [0, 1, 2]
    assert s.budget.tokens == 0 and s.budget.sequences == 0


async def test_a_cancelled_sequence_leaves_the_batch(model: torch.nn.Module) -> None:
    s = scheduler(model, KvBudget(4096, 8))
    s.start()
    task = asyncio.create_task(run(s, [5, 6, 7], 200))
    other = asyncio.create_task(run(s, [8, 9], 30))
    while s.engine.batch.tokens == 0:
        await asyncio.sleep(0.005)
    task.cancel()
    assert await other == reference(model, [8, 9], 30)  # undisturbed by the other leaving
    for _ in range(200):
        if len(s.engine.batch) == 0:
            break
        await asyncio.sleep(0.005)
    assert s.active == 0 and len(s.engine.batch) == 0 and s.budget.tokens == 0
    await s.stop()


class GatedEngine(CountingEngine):
    """Its prefill pass waits for the test to open the gate, so a cancel lands mid-pass."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.entered, self.gate = threading.Event(), threading.Event()

    def prefill(self, prompts: list[Prompt]) -> Prefilled:
        self.entered.set()
        self.gate.wait(10)
        return super().prefill(prompts)


async def test_a_sequence_cancelled_during_its_prefill_leaves_and_the_others_go_on(
    model: torch.nn.Module,
) -> None:
    engine = GatedEngine(model)
    s = Scheduler(
        engine,
        "lm",
        context=256,
        eos_ids=frozenset(),
        budget=KvBudget(4096, 8),
        max_wait_s=5.0,
        executor=ThreadPoolExecutor(1),
        stats=ModelStats(),
    )
    gone = asyncio.create_task(run(s, [5, 6, 7], 50))
    kept = asyncio.create_task(run(s, [8, 9], 20))
    await asyncio.sleep(0.05)  # both wait: they are admitted and prefilled together
    s.start()
    await asyncio.to_thread(engine.entered.wait, 10)
    gone.cancel()
    await asyncio.sleep(0.01)
    engine.gate.set()
    assert await kept == reference(model, [8, 9], 20)
    # the row it left behind is cut out; the scheduler serves on
    assert await run(s, [10, 11, 12], 10) == reference(model, [10, 11, 12], 10)
    for _ in range(200):
        if len(engine.batch) == 0:
            break
        await asyncio.sleep(0.005)
    assert s.active == 0 and len(engine.batch) == 0 and s.budget.tokens == 0
    await s.stop()


async def finished(s: Scheduler, prompt: list[int], new: int) -> tuple[list[int], Finished]:
    tokens: list[int] = []
    async for event in s.generate(checked(prompt, new)):
        if isinstance(event, Tokens):
            tokens += event.ids
        else:
            return tokens, event
    raise AssertionError("no Finished")


PROMPTS = [[(i * 37 + j * 11) % 590 + 3 for j in range(3 + i * 4)] for i in range(8)]


async def test_sequences_arriving_together_are_prefilled_in_one_pass(
    model: torch.nn.Module,
) -> None:
    s = scheduler(model, KvBudget(4096, 8))
    streams = [asyncio.create_task(run(s, p, 12 + i)) for i, p in enumerate(PROMPTS)]
    await asyncio.sleep(0.05)  # all eight wait before the loop starts
    s.start()
    results = await asyncio.gather(*streams)
    await s.stop()
    assert isinstance(s.engine, CountingEngine) and s.engine.prefills == [8]
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, results, strict=True)):
        assert tokens == reference(model, prompt, 12 + i), f"stream {i}"


async def test_the_prefill_budget_splits_a_turn(model: torch.nn.Module) -> None:
    s = scheduler(model, KvBudget(4096, 8), max_prefill_tokens=60)
    streams = [asyncio.create_task(run(s, [4 + i] * 20, 5)) for i in range(4)]
    await asyncio.sleep(0.05)
    s.start()
    results = await asyncio.gather(*streams)
    await s.stop()
    assert isinstance(s.engine, CountingEngine) and s.engine.prefills == [3, 1]  # 3 x 20 <= 60
    assert results == [reference(model, [4 + i] * 20, 5) for i in range(4)]


async def test_a_shared_prefix_is_reused_and_the_output_is_unchanged(
    model: torch.nn.Module,
) -> None:
    s = scheduler(model, KvBudget(4096, 8), prefix_cache_tokens=1024)
    s.start()
    system = [(j * 13) % 500 + 3 for j in range(24)]
    first, done = await finished(s, [*system, 7, 8, 9], 10)
    assert done.cached_tokens == 0 and first == reference(model, [*system, 7, 8, 9], 10)
    # together: two reuse the 24 tokens (one its whole prompt but the last token), one shares
    # nothing; prefilled in one pass with their prefixes padded to each other
    prompts = [[*system, 40, 41, 42, 43, 44], [*system, 7, 8], [5, 6, 7, 8]]
    results = await asyncio.gather(*(finished(s, p, 10) for p in prompts))
    await s.stop()
    assert [done.cached_tokens for _, done in results] == [24, 25, 0]
    for i, (prompt, (tokens, done)) in enumerate(zip(prompts, results, strict=True)):
        assert tokens == reference(model, prompt, 10), f"prompt {i}"
        assert done.prompt_tokens == len(prompt)


async def test_stopping_ends_a_running_sequence_cancelled_with_its_tokens(
    model: torch.nn.Module,
) -> None:
    s = scheduler(model, KvBudget(4096, 8))
    s.start()
    events: list[Tokens | Finished] = []

    async def consume() -> None:
        async for event in s.generate(checked([5, 6, 7], 200)):
            events.append(event)

    task = asyncio.create_task(consume())
    while not events:
        await asyncio.sleep(0.005)
    await s.stop()
    await task
    tokens = [t for e in events if isinstance(e, Tokens) for t in e.ids]
    last = events[-1]
    assert isinstance(last, Finished) and last.reason == "cancelled"
    assert last.completion_tokens == len(tokens) and 0 < len(tokens) < 200
    assert tokens == reference(model, [5, 6, 7], len(tokens))
    assert s.active == 0 and s.budget.tokens == 0
