"""Sentence vectors from token vectors: pooling over the attention mask and L2 normalisation,
done here so that an embedding model answers [B, D] and never ships [B, T, H] over the wire."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, H] token vectors → [B, H]: the mean over real tokens, or the first ([CLS]) one."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r}; use one of {', '.join(POOLINGS)}")
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: a row without tokens would divide by zero (requests never carry one, batches may)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embed(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Pooled sentence vectors, unit length when `normalize`, computed in fp32 whatever the
    model's precision (fp16 sums over long sequences lose digits)."""
    vectors = pool(hidden.float(), mask, mode)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
