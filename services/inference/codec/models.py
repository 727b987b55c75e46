"""Describing models and the server on the wire: ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics and RepositoryIndex responses, built from the domain's configs and records."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

import fmserve
from fmserve.core.repository import ModelConfig, version_order
from fmserve.core.tasks import TaskName
from services.inference import signature
from services.inference.memory import Footprint
from services.inference.registry import IndexEntry, State, VersionStats
from services.inference.signature import TensorSpec
from services.inference.stats import Duration

SERVER_NAME = "fmserve-inference"
# Triton protocol extensions this server implements (clients probe for them).
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
# Triton's platform names for what runs a version (its backend)
PLATFORMS = {"torch": "pytorch", "onnxruntime": "onnxruntime_onnx"}
_DATA_TYPES = {"INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32, "FP32": mc.TYPE_FP32}


def server_metadata() -> service_pb2.ServerMetadataResponse:
    return service_pb2.ServerMetadataResponse(
        name=SERVER_NAME, version=fmserve.__version__, extensions=EXTENSIONS
    )


def metadata_to_wire(config: ModelConfig, version: str) -> service_pb2.ModelMetadataResponse:
    """A model's metadata; its platform is the named (or default) version's backend."""
    tensor = service_pb2.ModelMetadataResponse.TensorMetadata
    return service_pb2.ModelMetadataResponse(
        name=config.name,
        versions=sorted(config.versions, key=version_order),
        platform=PLATFORMS[config.runtime_of(version).backend],
        inputs=[
            tensor(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in signature.inputs(config)
        ],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in signature.outputs(config)
        ],
    )


def config_to_wire(config: ModelConfig, version: str) -> service_pb2.ModelConfigResponse:
    """Triton's model configuration: batch dimension implicit (max_batch_size), two priority
    levels (1 interactive, the default; 2 background), every version served; the platform and
    runtime parameters are the named (or default) version's."""
    batching = config.batching
    model = mc.ModelConfig(
        name=config.name,
        platform=PLATFORMS[config.runtime_of(version).backend],
        max_batch_size=batching.max_batch_size,
        input=[_input(spec) for spec in signature.inputs(config)],
        output=[_output(spec) for spec in signature.outputs(config)],
        version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
            priority_levels=2,
            default_priority_level=1,
        ),
    )
    if config.task is TaskName.TEXT_GENERATION:
        _as_decoupled(model, config)
    for key, value in _parameters(config, version).items():
        model.parameters[key].string_value = value
    return service_pb2.ModelConfigResponse(config=model)


def _as_decoupled(model: mc.ModelConfig, config: ModelConfig) -> None:
    """A generation model as Triton declares a decoupled one: any number of responses per
    request, one prompt per request (no batch dimension), batched by its own scheduler."""
    model.max_batch_size = 0
    model.ClearField("dynamic_batching")
    del model.input[:]
    model.input.extend(_input(spec, batched=False) for spec in signature.inputs(config))
    del model.output[:]
    model.output.append(_output(signature.TOKEN_IDS, batched=False))
    model.model_transaction_policy.decoupled = True


def statistics_to_wire(records: list[VersionStats]) -> service_pb2.ModelStatisticsResponse:
    return service_pb2.ModelStatisticsResponse(model_stats=[_model_stats(r) for r in records])


def index_to_wire(
    entries: list[IndexEntry], ready_only: bool
) -> service_pb2.RepositoryIndexResponse:
    index = service_pb2.RepositoryIndexResponse.ModelIndex
    return service_pb2.RepositoryIndexResponse(
        models=[
            index(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
            if not ready_only or e.state is State.READY
        ]
    )


def _input(spec: TensorSpec, batched: bool = True) -> mc.ModelInput:
    # dims are ModelMetadata's shape less the batch dimension, and no reshape: perf_analyzer
    # builds each input as [batch] + dims, and cannot shape one whose dims leave nothing.
    return mc.ModelInput(
        name=spec.name,
        data_type=_DATA_TYPES[spec.datatype],
        dims=spec.shape[1:] if batched else spec.shape,
        optional=spec.optional,
        allow_ragged_batch=batched and spec.name == signature.INPUT_IDS.name,
    )


def _output(spec: TensorSpec, batched: bool = True) -> mc.ModelOutput:
    dims = spec.shape[1:] if batched else spec.shape
    return mc.ModelOutput(name=spec.name, data_type=_DATA_TYPES[spec.datatype], dims=dims)


def _parameters(config: ModelConfig, version: str) -> dict[str, str]:
    runtime = config.runtime_of(version)
    parameters = {
        "task": str(config.task),
        "max_length": str(config.max_length),
        "max_batch_tokens": str(config.batching.max_batch_tokens),
        "backend": runtime.backend,
        "device": runtime.device,
        "precision": runtime.precision,
    }
    if config.labels:
        parameters["labels"] = ",".join(config.labels)
    if config.image_size:
        parameters["image_size"] = str(config.image_size)
    if config.task is TaskName.EMBEDDING:
        parameters |= {"pooling": config.pooling, "normalize": str(config.normalize).lower()}
    if config.task is TaskName.TEXT_GENERATION:
        generation = config.generation
        parameters |= {
            "max_new_tokens": str(generation.max_new_tokens),
            "default_max_new_tokens": str(generation.default_max_new_tokens),
            "max_batch_tokens": str(generation.max_batch_tokens),
            "max_sequences": str(generation.max_sequences),
        }
    return parameters


def _model_stats(record: VersionStats) -> service_pb2.ModelStatistics:
    stats = record.stats
    return service_pb2.ModelStatistics(
        name=record.name,
        version=record.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=service_pb2.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            service_pb2.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(stats.batches.items())
        ],
        memory_usage=_memory_usage(record.footprint),
    )


def _memory_usage(footprint: Footprint | None) -> list[service_pb2.MemoryUsage]:
    """Triton's memory usage of a loaded version: its weights, on their device."""
    if footprint is None:
        return []
    return [
        service_pb2.MemoryUsage(
            type=footprint.kind, id=footprint.device_id, byte_size=footprint.bytes
        )
    ]


def _duration(duration: Duration) -> service_pb2.StatisticDuration:
    return service_pb2.StatisticDuration(count=duration.count, ns=duration.ns)
