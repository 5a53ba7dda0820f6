"""Kafka plumbing: message schemas, the topology from topics.yaml, admin, client, embedded broker, metrics, logs."""
