"""A version's torch module (fp32, from its safetensors) as ONNX, and its int8 quantisation.

The exporter is torch.onnx's dynamo one (`torch.export`): torch 2.13 makes it the default and
keeps the TorchScript exporter deprecated; on all-MiniLM-L6-v2 both gave the same graph within
5e-6 of torch, dynamic batch and sequence axes included, the dynamo one in ~12 s on this CPU.

int8 is onnxruntime's dynamic quantisation of the MatMul weights, per output channel, except the
MatMuls that read an activation (GELU/ReLU) output: BERT's feed-forward down-projections see
outlier activations, and quantising them alone cost all-MiniLM-L6-v2 most of its cosine (0.984
min over a sample with them, 0.991 without; per-tensor weights: 0.92).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from fmserve.core.tasks import TaskName

MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
_CLASSES = {
    TaskName.TEXT_CLASSIFICATION: AutoModelForSequenceClassification,
    TaskName.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
}
_ACTIVATIONS = {"Gelu", "FastGelu", "BiasGelu", "Relu", "QuickGelu"}


class Graph(torch.nn.Module):
    """The module with the serving signature: (input_ids, attention_mask) → its one output,
    hidden states [B, T, H] (encoder) or logits."""

    def __init__(self, module: torch.nn.Module, hidden: bool) -> None:
        super().__init__()
        self.module = module
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.module(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if self.hidden else out.logits


def load_graph(files: Path, task: TaskName, hidden: bool) -> Graph:
    """The version's fp32 torch module (safetensors only, no remote code) in eval mode."""
    if not any(files.glob("*.safetensors")):
        raise ValueError("the source version has no *.safetensors weights")
    auto_class: Any = AutoModel if hidden else _CLASSES[task]
    module = auto_class.from_pretrained(
        files, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )
    return Graph(module.float().eval(), hidden)


def export(graph: Graph, path: Path) -> None:
    """model.onnx with dynamic batch and sequence axes, weights inside the file."""
    ids = torch.ones(2, 8, dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    with warnings.catch_warnings():
        # it names the axes itself ("shares the same shape constraints"): nothing to act on
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (ids, torch.ones_like(ids)),
            dynamo=True,
            verbose=False,
            input_names=list(INPUT_NAMES),
            output_names=["output"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
        )
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path), external_data=False)


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation (see the module's docstring for the choices)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    after_activation = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and producers.get(node.input[0]) in _ACTIVATIONS
    ]
    # its advice to run its pre-processing first is a warning on the root logger
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=after_activation,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


def run(session: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An onnxruntime session's output for a padded batch."""
    return np.asarray(session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
