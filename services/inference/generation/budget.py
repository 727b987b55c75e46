"""Admission to the running batch: a sequence holds KV-cache room for its prompt and its
max_new_tokens from admission until it ends, so the running sequences can never outgrow the
budget, whatever they generate. First come, first served: a sequence that does not fit yet
blocks the ones behind it, so a long request is not starved by a stream of short ones."""

from __future__ import annotations

from fmserve.errors import Overloaded


class KvBudget:
    def __init__(self, max_tokens: int, max_sequences: int) -> None:
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self.tokens = 0
        """Reserved by the running sequences."""
        self.sequences = 0

    def check_possible(self, tokens: int) -> None:
        """Refuse at once a sequence that could not fit even alone."""
        if tokens > self.max_tokens:
            raise Overloaded(
                f"the prompt and max_new_tokens need {tokens} tokens of KV cache; this model's "
                f"budget is {self.max_tokens} ([generation] max_batch_tokens): ask for fewer"
            )

    def fits(self, tokens: int) -> bool:
        return self.sequences < self.max_sequences and self.tokens + tokens <= self.max_tokens

    def take(self, tokens: int) -> None:
        self.tokens += tokens
        self.sequences += 1

    def give_back(self, tokens: int) -> None:
        self.tokens -= tokens
        self.sequences -= 1
