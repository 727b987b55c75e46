"""The shared core every service uses: errors live one level up (public); here settings,
request context, logs, metrics, tracing, the task table, the job vocabulary, tensors on the
wire, the model repository and the batcher."""
