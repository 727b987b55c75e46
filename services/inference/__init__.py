"""The inference service: models on CPU or GPU behind the KServe v2 / Triton gRPC protocol, with
lazy per-version loading, dynamic batching and per-batch padding of ragged token ids."""
