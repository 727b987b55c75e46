"""The inference service's wire ↔ domain conversions, named for their direction as in every
service, and imported the same way (`from services.inference import codec`; `codec.to_domain`).

A package, where the other services have one module, because the KServe v2 protocol has two
unrelated halves, each long enough to read on its own:
    infer.py    ModelInfer: request tensors (raw bytes or typed contents, ragged or padded)
                → per-sequence ids; an output array → a response
    models.py   describing the server and its models: ServerMetadata, ModelMetadata,
                ModelConfig, ModelStatistics and RepositoryIndex, from configs and records
    repository.py  the parameters of RepositoryModelLoad / RepositoryModelUnload
"""

from services.inference.codec.infer import to_domain, to_wire
from services.inference.codec.models import (
    config_to_wire,
    index_to_wire,
    metadata_to_wire,
    server_metadata,
    statistics_to_wire,
)
from services.inference.codec.repository import load_to_domain, unload_to_domain

__all__ = [
    "config_to_wire",
    "index_to_wire",
    "load_to_domain",
    "metadata_to_wire",
    "server_metadata",
    "statistics_to_wire",
    "to_domain",
    "to_wire",
    "unload_to_domain",
]
