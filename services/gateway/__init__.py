"""The gateway: the public `fmserve.v1.Gateway` API, validation, model routing, the result
cache, and orchestration of the synchronous path across the stage services."""
