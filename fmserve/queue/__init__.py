"""The asynchronous path over RabbitMQ: the topology, the broker (publishing), the consumer
(acks, retries, priorities), job records in the cache service, the stage worker every stage
service runs, and the dead-letter consumer."""
