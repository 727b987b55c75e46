"""Device and precision rules, safetensors only, and load errors without server paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmserve.core.repository import Runtime
from fmserve.core.tasks import TaskName
from fmserve.errors import Unavailable, scrub_paths
from services.inference.loading import (
    LoadFailed,
    Placement,
    _cpu_has_native_bf16,
    load_module,
    place,
    require_safetensors,
)

pytestmark = pytest.mark.timeout(30)
torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("device", "precision", "gpus", "expected"),
    [
        ("auto", "fp32", 0, Placement(torch.device("cpu"), torch.float32)),
        ("auto", "fp32", 1, Placement(torch.device("cuda"), torch.float32)),
        ("auto", "fp16", 1, Placement(torch.device("cuda"), torch.float16)),
        ("cuda:1", "bf16", 2, Placement(torch.device("cuda:1"), torch.bfloat16)),
        (
            "cpu",
            "bf16",
            1,
            Placement(torch.device("cpu"), torch.bfloat16),
        ),  # fast with AVX512-BF16 or AMX
        ("auto", "bf16", 0, Placement(torch.device("cpu"), torch.bfloat16)),
        ("cpu", "int8", 0, Placement(torch.device("cpu"), torch.float32, quantize=True)),
        # int8 kernels are CPU-only, so "auto" picks the CPU even beside a GPU
        ("auto", "int8", 1, Placement(torch.device("cpu"), torch.float32, quantize=True)),
    ],
)
def test_valid_combinations(device: str, precision: str, gpus: int, expected: Placement) -> None:
    assert place(Runtime(device=device, precision=precision), cuda_devices=gpus) == expected


@pytest.mark.parametrize(
    ("device", "precision", "gpus", "message"),
    [
        ("auto", "fp16", 0, "fp16 needs a GPU"),
        ("cpu", "fp16", 1, "fp16 needs a GPU"),
        ("cuda", "int8", 1, "int8 .* runs on the CPU only"),
        ("cuda", "fp32", 0, "asks for a GPU this machine lacks"),
        ("cuda:2", "fp32", 2, "asks for a GPU this machine lacks"),
        ("tpu", "fp32", 0, "unknown runtime.device 'tpu'"),
        ("mps", "fp32", 0, "unknown runtime.device 'mps'"),
        (
            "cpu",
            "fp64",
            0,
            "unknown runtime.precision 'fp64'; use auto or one of fp32, fp16, bf16, int8",
        ),
    ],
)
def test_invalid_combinations_fail_with_the_fix(
    device: str, precision: str, gpus: int, message: str
) -> None:
    with pytest.raises(LoadFailed, match=message) as caught:
        place(Runtime(device=device, precision=precision), cuda_devices=gpus)
    assert isinstance(caught.value, Unavailable)  # reported as UNAVAILABLE with the reason


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(LoadFailed, match=r"no \*\.safetensors weights") as caught:
        require_safetensors(tmp_path)
    assert str(tmp_path) not in caught.value.message


def test_unreadable_weights_fail_without_paths(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    cpu = Placement(torch.device("cpu"), torch.float32)
    with pytest.raises(LoadFailed, match="its weights could not be loaded") as caught:
        load_module(tmp_path, TaskName.EMBEDDING, cpu)
    assert str(tmp_path) not in caught.value.message
    assert "/tmp" not in caught.value.message


def test_scrub_paths_keeps_the_first_line_without_paths() -> None:
    message = "Error no file named model.safetensors found in /srv/models/x/1.\nmore detail"
    assert scrub_paths(message) == "Error no file named model.safetensors found in <path>."


def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively() -> None:
    expected = torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    placement = place(Runtime(device="auto", precision="auto"), cuda_devices=0)
    assert placement == Placement(torch.device("cpu"), expected)
