"""The shared core every service uses: errors live one level up (public); here settings,
request context, logs, metrics, tracing, the task table, tensors on the wire, the model
repository and the batcher."""
