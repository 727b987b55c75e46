"""Choosing each sequence's next token from its logits, in the order transformers' `generate`
applies its processors (repetition penalty, temperature, top-k, top-p), so that greedy decoding
here is token for token what `model.generate(do_sample=False)` gives. Each sequence samples with
its own torch.Generator: seeded, its tokens do not depend on which others share its steps."""

from __future__ import annotations

import random

import torch

from services.inference.generation.params import Sampling


def generator(sampling: Sampling) -> torch.Generator | None:
    """A sequence's own random stream (None for greedy decoding, which needs none)."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
    return torch.Generator().manual_seed(seed)


def next_token(
    logits: torch.Tensor,
    sampling: Sampling,
    seen: torch.Tensor,
    rng: torch.Generator | None,
) -> int:
    """One sequence's next token. `logits` [V] (float32, CPU), `seen` the ids of its prompt and
    of what it generated so far (the repetition penalty's history, as transformers counts it)."""
    if sampling.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k:
        logits = keep_top_k(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = keep_top_p(logits, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already present become less likely: positive logits divided by the penalty,
    negative ones multiplied (CTRL's rule, transformers' RepetitionPenaltyLogitsProcessor)."""
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -float("inf"))


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: the smallest set of most likely tokens whose probability reaches
    top_p (always at least the most likely one)."""
    ordered, order = torch.sort(logits, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    return logits.masked_fill(remove.scatter(0, order, remove), -float("inf"))
