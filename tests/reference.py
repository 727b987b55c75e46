"""The models called in-process with plain transformers: what the cluster must agree with."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)


@cache
def _load(kind: str, folder: Path) -> tuple[object, torch.nn.Module]:
    model_class = {
        "encoder": AutoModel,
        "classifier": AutoModelForSequenceClassification,
        "tagger": AutoModelForTokenClassification,
    }[kind]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tokenizer, model_class.from_pretrained(folder, local_files_only=True).eval()


def embed(folder: Path, texts: list[str]) -> np.ndarray:
    """Tokenize, forward, mean-pool over the attention mask, L2-normalise."""
    tokenizer, model = _load("encoder", folder)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def classify(folder: Path, texts: list[str]) -> np.ndarray:
    """Class probabilities [N, C] in the model's label order."""
    tokenizer, model = _load("classifier", folder)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**batch).logits, dim=-1).numpy()


def token_labels(folder: Path, text: str) -> list[tuple[str, int, int]]:
    """Per real token of one text: (argmax label, char start, char end)."""
    tokenizer, model = _load("tagger", folder)
    batch = tokenizer([text], return_tensors="pt", return_offsets_mapping=True)
    offsets = batch.pop("offset_mapping")[0].tolist()
    with torch.inference_mode():
        ids = model(**batch).logits[0].argmax(-1).tolist()
    labels = model.config.id2label
    return [(labels[i], s, e) for i, (s, e) in zip(ids, offsets, strict=True) if e > s]
