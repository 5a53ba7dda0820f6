"""The Faust app and its topics.

    documents ─▶ ingest_documents ─▶ chunk ─▶ encode ─▶ Milvus upsert
    queries   ─▶ answer_queries   ─▶ take(n, within=t) ─▶ encode ─▶ retrieve ─▶ generate ─▶ answers
    queries   ─▶ synthesize_documents ─▶ generated-documents ─▶ index_generated, learn_from_generated
    retention-updates ─▶ apply_retention_updates (re-index on a promoted encoder)

Run it with ``hybridrag worker`` or ``faust -A hybridrag.agents.app worker``.
Each agent lives in its own module (``hybridrag.agents.answer_queries`` and so
on); the shared decode, dead-letter, retry and ack path is
:mod:`hybridrag.agents.stream_processor`.
"""

from __future__ import annotations

import faust

from hybridrag.agents.kafka.faust_config import HybridApp, faust_settings
from hybridrag.agents.settings import Settings

settings = Settings()
topology = settings.topology

# Each agent, the timers and the web pages live in their own module and register
# themselves on `app` when imported; the worker imports them at start (Faust's
# autodiscovery), so `faust -A hybridrag.agents.app worker` finds them all.
AGENT_MODULES = [f"hybridrag.agents.{name}" for name in (
    "ingest_documents", "answer_queries", "synthesize_documents", "index_generated", "learn_from_generated",
    "apply_retention_updates", "timers", "web",
)]

app = HybridApp(settings.app_id, autodiscover=AGENT_MODULES, **faust_settings(settings))
app.fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms


def _topic(name: str) -> faust.TopicT:
    return app.topic(name, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")


documents_topic = _topic(topology["documents"].name)
queries_topic = _topic(topology["queries"].name)
answers_topic = _topic(topology["answers"].name)
generated_topic = _topic(topology["generated-documents"].name)
retention_topic = _topic(topology["retention-updates"].name)
# each topic's dead-letter twin, by the source topic's name
dead_letter_topics = {spec.name: _topic(spec.dlq) for spec in topology.topics.values()}
