"""Create the topics of ``topics.yaml`` on any Kafka-protocol broker, idempotently."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from hybridrag.agents.settings import Settings

log = logging.getLogger(__name__)


async def create_topics(settings: Settings) -> dict[str, str]:
    """Create every topic and DLQ that does not exist yet. Returns {topic: "created" | "exists"}."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, **settings.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = settings.topology.all_names()
        new = [
            NewTopic(name, num_partitions=parts, replication_factor=rf, topic_configs={"retention.ms": str(ret)})
            for name, parts, rf, ret in wanted
            if name not in existing
        ]
        if new:
            await admin.create_topics(new)
        status = {name: ("created" if name not in existing else "exists") for name, *_ in wanted}
        log.info("topics: %d created, %d existed", len(new), len(wanted) - len(new))
        return status
    finally:
        await admin.close()
