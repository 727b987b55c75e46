"""One loaded model version: pads a batch of ragged sequences to its longest (or stacks a batch
of images), runs its backend's forward pass (backend.py: torch or onnxruntime) under
inference_mode, and returns one numpy array per item. Called in an executor thread, never on
the event loop.

    embedding                    pooled (+ normalised) hidden states   [D] per sequence
    text-classification          the classifier's logits               [C] per sequence
      with prototypes            cosine to each label's centroid * T   [C] per sequence
    token-classification         per-token logits                      [L, C] per sequence
    image-classification         the classifier's logits               [C] per image
    image-embedding (CLIP)       L2-normalised image or text embeds    [D] per image or text
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from fmserve.core.pooling import POOLINGS, embed
from fmserve.core.repository import ModelConfig, Runtime
from fmserve.core.tasks import TaskName
from fmserve.errors import Overloaded
from services.inference.backend import Backend, ImageBackend, load_backend
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
        # CLIP keeps its text settings in text_config; a ViT has no text settings at all.
        hf_config: Any = getattr(backend.hf_config, "text_config", backend.hf_config)
        self.vocab_size = int(getattr(hf_config, "vocab_size", 0))
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

    def cost(self, item: np.ndarray) -> int:
        """An item's share of a batch's max_batch_tokens: a sequence its tokens; an image
        ([3, H, W]) counts as one, so max_batch_size alone bounds a batch of images."""
        return len(item) if item.ndim == 1 else 1

    def forward(self, sequences: list[np.ndarray]) -> Forward:
        """One output per item (token ids [T], or an image [3, H, W]), in order, and how long
        each phase took; runs on the caller's thread. A batch may mix texts and images (CLIP):
        each kind runs as its own forward pass."""
        started = time.perf_counter_ns()
        groups = _by_kind(sequences)
        try:
            with torch.inference_mode():
                prepared = [(rows, self._prepared(sequences, rows)) for rows in groups]
                copied = time.perf_counter_ns()
                outs = [(rows, self._run(inputs)) for rows, inputs in prepared]
                self.backend.synchronize()
        except torch.OutOfMemoryError as exc:
            raise Overloaded(
                f"the model ran out of memory on a batch of {len(sequences)} items; "
                "retry, or send fewer or shorter inputs"
            ) from exc
        computed = time.perf_counter_ns()
        outputs = self._cut(sequences, outs)
        done = time.perf_counter_ns()
        return Forward(outputs, copied - started, computed - copied, done - computed)

    def _prepared(self, items: list[np.ndarray], rows: list[int]) -> tuple[torch.Tensor, ...]:
        if items[rows[0]].ndim == 3:
            pixels = np.stack([items[row] for row in rows])
            return (torch.from_numpy(pixels).to(self.backend.device),)
        return self._padded([items[row] for row in rows])

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Images come prepared as (pixel_values,), token ids as (ids, mask)."""
        if len(inputs) == 1:
            return self._image_head(inputs[0])
        return self._head(*inputs)

    def _cut(
        self, items: list[np.ndarray], outs: list[tuple[list[int], torch.Tensor]]
    ) -> list[np.ndarray]:
        """Each item's own output, back in the batch's order."""
        outputs: list[np.ndarray] = [np.empty(0)] * len(items)
        for rows, out in outs:
            array = out.float().cpu().numpy()
            for index, row in enumerate(rows):
                outputs[row] = array[index, : len(items[row])] if self.per_token else array[index]
        return outputs

    def _padded(self, sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad(sequences, self._pad_id)
        device = self.backend.device
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def _pick_head(self) -> Head:
        if self.config.prototypes:
            return self._zero_shot
        if self.config.task is TaskName.EMBEDDING:
            return self._embed
        if self.config.task is TaskName.IMAGE_EMBEDDING:
            return self._text_embeds
        return self._logits

    def _image_head(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image models: a classifier's logits, or CLIP's image embeddings, L2-normalised."""
        backend = cast(ImageBackend, self.backend)
        out = backend.images(pixels)
        if self.config.task is TaskName.IMAGE_EMBEDDING:
            return F.normalize(out.float(), p=2, dim=-1)
        return out

    def _text_embeds(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CLIP's text embeddings, L2-normalised: the backend answers its projected features."""
        return F.normalize(self.backend(ids, mask).float(), p=2, dim=-1)

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


def _by_kind(items: list[np.ndarray]) -> list[list[int]]:
    """The rows of the token-id sequences and the rows of the images, each group non-empty."""
    images = [row for row, item in enumerate(items) if item.ndim == 3]
    texts = [row for row, item in enumerate(items) if item.ndim != 3]
    return [rows for rows in (texts, images) if rows]
