"""GGUF model files (llama.cpp's format) as Hugging Face folders: a GGUF version is dequantised
once into a safetensors folder in a shared cache, and every service (the inference service's
model, preprocess's and postprocess's tokenizer) reads that folder.

transformers reads GGUF itself, but slowly (25-60 s for SmolLM2-135M here: it parses the whole
tokenizer vocabulary and dequantises every tensor); the converted copy reloads in 1-2 s. The
conversion is written into a temporary folder and renamed into place, under a file lock, so two
services that start together convert once and nobody reads half a folder."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fmserve.gguf")

DEFAULT_CACHE = Path.home() / ".cache" / "fmserve" / "converted"


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf"


def converted_folder(gguf_file: Path, cache: Path = DEFAULT_CACHE) -> Path:
    """The Hugging Face folder (config, safetensors, tokenizer, generation config) of a GGUF
    file, converting it first when the cache has no copy of this exact file."""
    target = cache / _cache_name(gguf_file)
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it right now
        if not target.is_dir():
            _convert(gguf_file, target)
    return target


def _cache_name(gguf_file: Path) -> str:
    """A folder name per version of the file: a replaced file converts again."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _convert(gguf_file: Path, target: Path) -> None:
    # Imported here: services that only read the repository never pay for transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s to safetensors (once per machine)", gguf_file.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = gguf_file.parent, gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        _forget_quantization(model)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf_file.name, time.perf_counter() - started)


def _forget_quantization(model: Any) -> None:
    """transformers dequantises GGUF weights to plain tensors but keeps the GGUF marker, and then
    refuses to save; the weights in memory are ordinary fp32, so the marker goes."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
