"""How close an exported version is to the torch fp32 one, and the gate it must pass.

    embedding models (and prototype encoders)   cosine of the pooled vectors, mean over the sample
    classifiers                                  top-1 agreement: texts (tokens, for token
                                                 classification) whose argmax is the same

The gate is on the mean; the report gives the worst text too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fmserve.core.pooling import embed

# The built-in sample: short and long, plain and odd texts, as served traffic has them.
SAMPLE = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "I love this product, it works great!",
    "This is the worst service I have ever used.",
    "The meeting is at three o'clock on Tuesday.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "Paris is the capital of France and its largest city.",
    "A cat sat on the mat and looked out of the window at the rain.",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "Please send the invoice to accounting before the end of the month.",
    "The patient was prescribed 20 mg of the drug twice a day.",
    "Can you recommend a good Italian restaurant near the station?",
    "The new update broke the login page on mobile devices.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Our flight was delayed by four hours because of the storm.",
    "The committee approved the budget for the next fiscal year.",
    "He scored the winning goal in the last minute of the match.",
    "Transformers process all tokens of a sequence in parallel.",
    "Mix the flour and the eggs, then bake for twenty minutes at 180 degrees.",
    "The museum is closed on Mondays and public holidays.",
    "Émile paid 12,50 € for a café au lait in the old town.",
    "Is it going to rain tomorrow afternoon in Berlin?",
    "The contract may be terminated by either party with thirty days' notice.",
    "She plays the violin in the city orchestra every weekend.",
    "Error 503: the service is temporarily unavailable, retry later.",
    "Fresh vegetables are cheaper at the market on Saturdays.",
    "The telescope observed a supernova in a distant galaxy.",
    "Thanks a lot for your help, I really appreciate it!",
    "The train to Munich leaves from platform 7 at 10:45.",
    "Battery life is excellent, but the screen scratches easily.",
    "def add(a, b): return a + b",
    "Machine learning models can be compressed with quantisation and pruning, trading a little "
    "accuracy for much lower latency and memory use when they are served on commodity CPUs.",
)


@dataclass(frozen=True)
class Report:
    metric: str
    """"cosine" or "agreement"."""
    value: float
    """The mean over the sample (what the gate reads)."""
    worst: float
    """The lowest text's value (1.0 or 0.0 per text for agreement)."""
    texts: int
    gate: float

    @property
    def passed(self) -> bool:
        return self.value >= self.gate

    def lines(self) -> list[str]:
        verdict = "passes" if self.passed else "FAILS"
        return [
            f"quality against the torch fp32 version on {self.texts} texts:",
            f"  {self.metric}: mean {self.value:.6f}, worst text {self.worst:.6f}",
            f"  gate {self.metric} >= {self.gate}: {verdict}",
        ]

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


def read_sample(path: Path | None) -> list[str]:
    """One text per non-empty line of `path`, or the built-in sample."""
    if path is None:
        return list(SAMPLE)
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"the sample file {path.name} has no texts")
    return texts


def cosine(
    reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray, pooling: str, gate: float
) -> Report:
    """Cosine of the pooled sentence vectors of two [B, T, H] hidden states."""
    mask_t = torch.from_numpy(mask)
    a = embed(torch.from_numpy(reference), mask_t, pooling, normalize=True)
    b = embed(torch.from_numpy(candidate), mask_t, pooling, normalize=True)
    per_text = (a * b).sum(dim=-1).numpy()
    return Report("cosine", float(per_text.mean()), float(per_text.min()), len(per_text), gate)


def agreement(
    reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray, gate: float
) -> Report:
    """Share of argmaxes that agree: per text for [B, C] logits, per real token for [B, T, C]
    (the worst is then the lowest text's share)."""
    same = reference.argmax(-1) == candidate.argmax(-1)
    if same.ndim == 1:
        return Report("agreement", float(same.mean()), float(same.min()), len(same), gate)
    real = mask.astype(bool)
    per_text = [row[keep].mean() for row, keep in zip(same, real, strict=True)]
    return Report("agreement", float(same[real].mean()), float(min(per_text)), len(same), gate)
