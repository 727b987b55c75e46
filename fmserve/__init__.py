"""fmserve: transformer models served as gRPC microservices.

The shared core lives here (generated stubs in `fmserve.v1`, settings, errors, telemetry,
batching, the model repository, the client); each service lives in `services/<name>/`.
"""

__version__ = "0.1.0"

from fmserve.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "__version__"]
