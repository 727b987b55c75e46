"""gRPC plumbing: the service lifecycle (health, reflection, /metrics, graceful stop), the server
interceptor, channels between services, the options both sides share and the health check CLI.
This package's `__init__` imports nothing, so the client and the health check stay light."""
