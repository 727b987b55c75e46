"""Describing models and the server on the wire: ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics and RepositoryIndex responses, built from the domain's configs and records."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

import fmserve
from fmserve.core.repository import ModelConfig, version_order
from fmserve.core.tasks import TaskName
from services.inference import signature
from services.inference.registry import IndexEntry, State
from services.inference.signature import TensorSpec
from services.inference.stats import Duration, ModelStats

SERVER_NAME = "fmserve-inference"
# Triton protocol extensions this server implements (clients probe for them).
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
PLATFORM = "pytorch"
_DATA_TYPES = {"INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32, "FP32": mc.TYPE_FP32}


def server_metadata() -> service_pb2.ServerMetadataResponse:
    return service_pb2.ServerMetadataResponse(
        name=SERVER_NAME, version=fmserve.__version__, extensions=EXTENSIONS
    )


def metadata_to_wire(config: ModelConfig) -> service_pb2.ModelMetadataResponse:
    tensor = service_pb2.ModelMetadataResponse.TensorMetadata
    return service_pb2.ModelMetadataResponse(
        name=config.name,
        versions=sorted(config.versions, key=version_order),
        platform=PLATFORM,
        inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in signature.INPUTS],
        outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in _outputs(config)],
    )


def config_to_wire(config: ModelConfig) -> service_pb2.ModelConfigResponse:
    """Triton's model configuration: batch dimension implicit (max_batch_size), two priority
    levels (1 interactive, the default; 2 background), every version served."""
    batching = config.batching
    model = mc.ModelConfig(
        name=config.name,
        platform=PLATFORM,
        max_batch_size=batching.max_batch_size,
        input=[_input(spec) for spec in signature.INPUTS],
        output=[_output(spec) for spec in _outputs(config)],
        version_policy=mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()),
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000),
            priority_levels=2,
            default_priority_level=1,
        ),
    )
    for key, value in _parameters(config).items():
        model.parameters[key].string_value = value
    return service_pb2.ModelConfigResponse(config=model)


def statistics_to_wire(
    records: list[tuple[str, str, ModelStats]],
) -> service_pb2.ModelStatisticsResponse:
    return service_pb2.ModelStatisticsResponse(
        model_stats=[_model_stats(name, version, stats) for name, version, stats in records]
    )


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


def _outputs(config: ModelConfig) -> list[TensorSpec]:
    return [signature.output(config)]


def _input(spec: TensorSpec) -> mc.ModelInput:
    # dims are ModelMetadata's shape less the batch dimension, and no reshape: perf_analyzer
    # builds each input as [batch] + dims, and cannot shape one whose dims leave nothing.
    return mc.ModelInput(
        name=spec.name,
        data_type=_DATA_TYPES[spec.datatype],
        dims=spec.shape[1:],
        optional=spec.optional,
        allow_ragged_batch=spec.name == signature.INPUT_IDS.name,
    )


def _output(spec: TensorSpec) -> mc.ModelOutput:
    return mc.ModelOutput(name=spec.name, data_type=_DATA_TYPES[spec.datatype], dims=spec.shape[1:])


def _parameters(config: ModelConfig) -> dict[str, str]:
    parameters = {
        "task": str(config.task),
        "max_length": str(config.max_length),
        "max_batch_tokens": str(config.batching.max_batch_tokens),
        "device": config.runtime.device,
        "precision": config.runtime.precision,
    }
    if config.labels:
        parameters["labels"] = ",".join(config.labels)
    if config.task is TaskName.EMBEDDING:
        parameters |= {"pooling": config.pooling, "normalize": str(config.normalize).lower()}
    return parameters


def _model_stats(name: str, version: str, stats: ModelStats) -> service_pb2.ModelStatistics:
    return service_pb2.ModelStatistics(
        name=name,
        version=version,
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
    )


def _duration(duration: Duration) -> service_pb2.StatisticDuration:
    return service_pb2.StatisticDuration(count=duration.count, ns=duration.ns)
