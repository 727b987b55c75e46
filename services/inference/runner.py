"""One loaded model version: pads a batch of ragged sequences to its longest, runs its
backend's forward pass (backend.py: torch or onnxruntime) under inference_mode, and returns one
numpy array per sequence. Called in an executor thread, never on the event loop.

    embedding                    pooled (+ normalised) hidden states   [D] per sequence
    text-classification          the classifier's logits               [C] per sequence
      with prototypes            cosine to each label's centroid * T   [C] per sequence
    token-classification         per-token logits                      [L, C] per sequence
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmserve.core.pooling import POOLINGS, embed
from fmserve.core.repository import ModelConfig, Runtime
from fmserve.core.tasks import TaskName
from fmserve.errors import Overloaded
from services.inference.backend import Backend, load_backend
from services.inference.loading import LoadFailed, load_tokenizer
from services.inference.ragged import pad

# Cosine similarities lie in [-1, 1]; scaled by 20 a softmax over them is decisive for a clear
# match (a lead of 0.3 over two other labels gives ~0.995) yet still graded for near ties.
PROTOTYPE_TEMPERATURE = 20.0

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Forward:
    """One forward pass: an output per sequence, and its phases as Triton's statistics name
    them, in nanoseconds."""

    outputs: list[np.ndarray]
    input_ns: int
    """compute_input: padding the batch and copying it to the device."""
    infer_ns: int
    """compute_infer: the model itself."""
    output_ns: int
    """compute_output: copying the outputs back and cutting them per sequence."""

    @property
    def total_ns(self) -> int:
        return self.input_ns + self.infer_ns + self.output_ns


class Runner:
    """Forward passes of one model version on its backend."""

    def __init__(self, config: ModelConfig, backend: Backend, runtime: Runtime) -> None:
        self.config = config
        self.backend = backend
        self.runtime = runtime
        hf_config: Any = backend.hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.per_token = config.task is TaskName.TOKEN_CLASSIFICATION
        pad_token_id = getattr(hf_config, "pad_token_id", None)
        self.pad_token_id: int | None = None if pad_token_id is None else int(pad_token_id)
        """The model's pad token, which real text never holds; None if its config names none."""
        self._pad_id = self.pad_token_id or 0
        self._centroids: torch.Tensor | None = None
        self._head = self._pick_head()

    @classmethod
    def load(cls, config: ModelConfig, version: str, cuda_devices: int | None = None) -> Runner:
        """Load a version's backend (and prototype centroids); raises LoadFailed with the fix."""
        if config.pooling not in POOLINGS:
            raise LoadFailed(f"unknown pooling {config.pooling!r}; use {' or '.join(POOLINGS)}")
        backend = load_backend(config, version, cuda_devices)
        runner = cls(config, backend, config.runtime_of(version))
        if config.prototypes:
            runner._centroids = runner._prototype_centroids(load_tokenizer(config.files(version)))
        return runner

    def cost(self, sequence: np.ndarray) -> int:
        """A sequence's share of a batch's max_batch_tokens: its tokens."""
        return len(sequence)

    def forward(self, sequences: list[np.ndarray]) -> Forward:
        """One output per sequence, in order, and how long each phase took; runs on the
        caller's thread."""
        started = time.perf_counter_ns()
        try:
            with torch.inference_mode():
                ids, mask = self._padded(sequences)
                copied = time.perf_counter_ns()
                out = self._head(ids, mask)
                self.backend.synchronize()
        except torch.OutOfMemoryError as exc:
            raise Overloaded(
                f"the model ran out of memory on a batch of {len(sequences)} sequences; "
                "retry, or send fewer or shorter texts"
            ) from exc
        computed = time.perf_counter_ns()
        array = out.float().cpu().numpy()
        if self.per_token:
            outputs = [array[i, : len(s)] for i, s in enumerate(sequences)]
        else:
            outputs = list(array)
        done = time.perf_counter_ns()
        return Forward(outputs, copied - started, computed - copied, done - computed)

    def _padded(self, sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad(sequences, self._pad_id)
        device = self.backend.device
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def _pick_head(self) -> Head:
        if self.config.prototypes:
            return self._zero_shot
        if self.config.task is TaskName.EMBEDDING:
            return self._embed
        return self._logits

    def _embed(
        self, ids: torch.Tensor, mask: torch.Tensor, normalize: bool | None = None
    ) -> torch.Tensor:
        hidden = self.backend(ids, mask)
        normalize = self.config.normalize if normalize is None else normalize
        return embed(hidden, mask, self.config.pooling, normalize)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.backend(ids, mask)

    def _zero_shot(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert self._centroids is not None  # set by load() for every prototype model
        vectors = self._embed(ids, mask, normalize=True)
        return vectors @ self._centroids.T * PROTOTYPE_TEMPERATURE

    def _prototype_centroids(self, tokenizer: Any) -> torch.Tensor:
        """Each label's prototype sentences embedded, averaged and normalised: [C, D]."""
        rows = []
        for label in self.config.labels:
            sentences = list(self.config.prototypes[label])
            encoded = tokenizer(sentences, truncation=True, max_length=self.config.max_length)
            ids = [np.asarray(row, dtype=np.int64) for row in encoded["input_ids"]]
            with torch.inference_mode():
                rows.append(self._embed(*self._padded(ids), normalize=True).mean(dim=0))
        return F.normalize(torch.stack(rows), p=2, dim=-1)
