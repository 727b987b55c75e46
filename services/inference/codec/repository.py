"""RepositoryModelLoad and RepositoryModelUnload parameters on the wire ↔ the domain.

Load takes `version` (string; the default version when absent) and `pin` (bool: never unloaded
to make room or for idleness); unload takes `version` (only that one; it is unpinned) and
tritonclient's `unload_dependents` (no model here has dependents). Triton lets a client send a
config or files (`config`, `file:...`) with a load: refused, since models come from the
repository only, so no client can make this server load code or weights it supplies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from fmserve.errors import InvalidInput

Parameters = Mapping[str, service_pb2.ModelRepositoryParameter]


@dataclass(frozen=True)
class Load:
    version: str = ""
    pin: bool = False


def load_to_domain(request: service_pb2.RepositoryModelLoadRequest) -> Load:
    parameters = request.parameters
    _refuse_unknown(parameters, ("version", "pin"))
    return Load(_string(parameters, "version"), _bool(parameters, "pin"))


def unload_to_domain(request: service_pb2.RepositoryModelUnloadRequest) -> str:
    """The version to unload; "" for every version of the model."""
    parameters = request.parameters
    _refuse_unknown(parameters, ("version", "unload_dependents"))
    _bool(parameters, "unload_dependents")
    return _string(parameters, "version")


def _refuse_unknown(parameters: Parameters, known: tuple[str, ...]) -> None:
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise InvalidInput(
            f"parameter {unknown[0]!r} is not accepted; this call takes {' and '.join(known)} "
            "(models load from the model repository only: no config or files)"
        )


def _string(parameters: Parameters, name: str) -> str:
    if name not in parameters:
        return ""
    if parameters[name].WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"parameter {name!r} must be a string")
    return parameters[name].string_param


def _bool(parameters: Parameters, name: str) -> bool:
    if name not in parameters:
        return False
    if parameters[name].WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(f"parameter {name!r} must be a bool")
    return parameters[name].bool_param
