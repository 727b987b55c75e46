"""The backend interface: `[runtime] backend` read and validated per model and per version,
the backend each version loads, onnxruntime's session settings, and what it refuses at load.

The ONNX graphs here are built by hand (onnx.helper), so no export runs: a tiny "encoder" whose
hidden state per token is its id (as a float) times 0.5, shaped [B, T, 1].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fmserve.core.repository import ModelRepository, Runtime
from fmserve.errors import ConfigError
from services.inference import onnx_backend
from services.inference.codec import config_to_wire, metadata_to_wire
from services.inference.generation.instance import load_engine
from services.inference.loading import LoadFailed
from services.inference.onnx_backend import OnnxBackend, Threads, session_options
from services.inference.runner import Runner
from services.inference.torch_backend import TorchBackend
from tests.models import build_classifier

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)

ONNX_VERSION_TOML = '\n[versions.2.runtime]\nbackend = "onnxruntime"\n'


def encoder_graph(inputs: tuple[str, ...] = ("input_ids", "attention_mask")) -> onnx.ModelProto:
    """[B, T] int64 ids → [B, T, 1] float: id * 0.5 (the other inputs are declared, unused)."""
    declared = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"]) for n in inputs]
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "T", 1])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "half"], ["scaled"]),
        helper.make_node("Unsqueeze", ["scaled", "axes"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "encoder", declared, [output], initializer=[half, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_version(folder: Path, model: onnx.ModelProto | bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 1, "vocab_size": 100}))
    if isinstance(model, bytes):
        (folder / "model.onnx").write_bytes(model)
    elif model is not None:
        onnx.save(model, str(folder / "model.onnx"))
    return folder


def embedding_model(root: Path, toml: str, model: onnx.ModelProto | bytes | None = None) -> Path:
    folder = root / "enc"
    write_version(folder / "1", model if model is not None else encoder_graph())
    (folder / "model.toml").write_text('task = "embedding"\n' + toml)
    return root


# --- [runtime] backend in model.toml ----------------------------------------------------------


def test_the_backend_is_torch_unless_model_toml_says(tmp_path: Path) -> None:
    embedding_model(tmp_path, "")
    assert ModelRepository(tmp_path).get("enc").runtime.backend == "torch"


def test_a_model_names_its_backend(tmp_path: Path) -> None:
    embedding_model(tmp_path, '[runtime]\nbackend = "onnxruntime"\n')
    config = ModelRepository(tmp_path).get("enc")
    assert config.runtime_of("1") == Runtime(backend="onnxruntime")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[runtime]\nbackend = "tensorrt"\n', "unknown [runtime] backend 'tensorrt'"),
        (
            '[runtime]\nbackend = "onnxruntime"\nprecision = "bf16"\n',
            "precision 'bf16' does not apply to onnxruntime",
        ),
        ('[versions.7.runtime]\nbackend = "onnxruntime"\n', "there is no version '7'"),
        ('[versions.1]\nsource = "x"\n', "takes only runtime, not source"),
    ],
)
def test_a_runtime_that_cannot_work_is_a_config_error(
    tmp_path: Path, toml: str, message: str
) -> None:
    embedding_model(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        ModelRepository(tmp_path).get("enc")
    assert message in caught.value.message
    assert str(tmp_path) not in caught.value.message


def test_a_version_overrides_the_model_runtime_key_by_key(tmp_path: Path) -> None:
    embedding_model(tmp_path, '[runtime]\ninstances = 2\nprecision = "auto"\n' + ONNX_VERSION_TOML)
    write_version(tmp_path / "enc" / "2", encoder_graph())
    config = ModelRepository(tmp_path).get("enc")
    assert config.runtime_of("1") == Runtime(backend="torch", precision="auto", instances=2)
    assert config.runtime_of("2") == Runtime(backend="onnxruntime", precision="auto", instances=2)
    assert config.runtime_of("") == config.runtime_of("2")  # the default version


# --- which backend a version loads ------------------------------------------------------------


def test_each_version_loads_its_own_backend(tmp_path: Path) -> None:
    """Version 1 torch (a tiny classifier), version 2 onnxruntime, side by side in one model."""
    folder = tmp_path / "clf"
    build_classifier(folder / "1", seed=1)
    write_version(folder / "2", encoder_graph())
    shutil.copy(folder / "1" / "config.json", folder / "2")  # its labels, as an export copies
    (folder / "model.toml").write_text('task = "text-classification"\n' + ONNX_VERSION_TOML)
    config = ModelRepository(tmp_path).get("clf")
    assert isinstance(Runner.load(config, "1").backend, TorchBackend)
    assert isinstance(Runner.load(config, "2").backend, OnnxBackend)


def test_an_onnx_embedding_runs_through_the_same_padding_and_pooling(tmp_path: Path) -> None:
    """Mean pooling over real tokens of id * 0.5, unnormalised: padding never counts."""
    embedding_model(tmp_path, 'normalize = false\n[runtime]\nbackend = "onnxruntime"\n')
    runner = Runner.load(ModelRepository(tmp_path).get("enc"), "1")
    forward = runner.forward([np.array([2, 4, 6]), np.array([10])])
    assert [o.tolist() for o in forward.outputs] == [[2.0], [5.0]]
    assert (runner.vocab_size, runner.pad_token_id) == (100, None)


def test_token_type_ids_are_fed_as_zeros_to_graphs_that_take_them(tmp_path: Path) -> None:
    graph = encoder_graph(("input_ids", "attention_mask", "token_type_ids"))
    embedding_model(tmp_path, 'normalize = false\n[runtime]\nbackend = "onnxruntime"\n', graph)
    runner = Runner.load(ModelRepository(tmp_path).get("enc"), "1")
    assert runner.forward([np.array([4])]).outputs[0].tolist() == [2.0]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (b"not a protobuf at all", "its model.onnx could not be loaded (corrupt"),
        (None, "its folder has no model.onnx; write one with `fmserve export"),
        (
            encoder_graph(("input_ids", "pixel_values")),
            "takes inputs ['input_ids', 'pixel_values']",
        ),
    ],
)
def test_an_onnx_version_that_cannot_load_says_why(
    tmp_path: Path, model: onnx.ModelProto | bytes | None, message: str
) -> None:
    embedding_model(tmp_path, '[runtime]\nbackend = "onnxruntime"\n', model)
    (tmp_path / "enc" / "1" / "model.onnx").unlink(missing_ok=model is None)
    if model is not None:
        write_version(tmp_path / "enc" / "1", model)
    with pytest.raises(LoadFailed) as caught:
        Runner.load(ModelRepository(tmp_path).get("enc"), "1")
    assert message in caught.value.message
    assert str(tmp_path) not in caught.value.message


def test_onnxruntime_runs_on_the_cpu_only(tmp_path: Path) -> None:
    embedding_model(tmp_path, '[runtime]\nbackend = "onnxruntime"\ndevice = "cuda"\n')
    with pytest.raises(LoadFailed, match="the onnxruntime backend runs on the CPU"):
        Runner.load(ModelRepository(tmp_path).get("enc"), "1")


def test_text_generation_on_onnxruntime_is_refused_at_load(tmp_path: Path) -> None:
    write_version(tmp_path / "lm" / "1")
    (tmp_path / "lm" / "model.toml").write_text(
        'task = "text-generation"\n[runtime]\nbackend = "onnxruntime"\n'
    )
    with pytest.raises(LoadFailed, match="text-generation runs on the torch backend only"):
        load_engine(ModelRepository(tmp_path).get("lm"), "1")


# --- threads, and what clients see --------------------------------------------------------------


@pytest.mark.parametrize(("spinning", "allowed"), [(False, "0"), (True, "1")])
def test_sessions_take_the_services_thread_settings(spinning: bool, allowed: str) -> None:
    options = session_options(Threads(intra_op=2, inter_op=1, spinning=spinning))
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allowed


def test_configure_threads_sets_the_sessions_this_process_opens() -> None:
    before = onnx_backend._threads
    try:
        onnx_backend.configure_threads(3, 1, spinning=False)
        assert onnx_backend._threads == Threads(3, 1, False)
    finally:
        onnx_backend._threads = before


def test_metadata_names_each_versions_platform(tmp_path: Path) -> None:
    embedding_model(tmp_path, ONNX_VERSION_TOML)
    write_version(tmp_path / "enc" / "2", encoder_graph())
    config = ModelRepository(tmp_path).get("enc")
    assert metadata_to_wire(config, "1").platform == "pytorch"
    assert metadata_to_wire(config, "2").platform == "onnxruntime_onnx"
    wire = config_to_wire(config, "2").config
    assert (wire.platform, wire.parameters["backend"].string_value) == (
        "onnxruntime_onnx",
        "onnxruntime",
    )
