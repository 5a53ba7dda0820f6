"""The streaming RAG job in Quix Streams, two ways.

    python bench/peers/quix_rag.py --variant message --bootstrap 127.0.0.1:9092 \\
        --queries-topic p-queries --answers-topic p-answers --documents-topic p-documents \\
        --group p-quix --status /tmp/quix.json

- ``message``: what the Quix tutorials show. ``app.dataframe(queries).apply(answer)``
  answers one query per model call and ``.to_topic(answers)`` produces it;
  documents are encoded and indexed one at a time by ``.update``.
- ``batching-sink``: a ``BatchingSink`` gets every record of a checkpoint and
  encodes them in one model call at ``flush()``. Checkpoints close every 64
  records or ``--batch-timeout-ms`` (``commit_every``, ``commit_interval``), the
  limits of hybridrag's ``take(64, within=...)``. The answers are produced, and the
  producer flushed, before the checkpoint commits the query offsets.

Both read fresh topics from ``earliest`` in one consumer group, with a 6 s
session timeout (a group join on Tansu takes about half of it). The job itself
is rag_job.py's, shared with the Pathway variants.
"""

from __future__ import annotations

import logging

from confluent_kafka import Producer
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch

import rag_job
from rag_job import JobConfig, PassageIndex, Status

VARIANTS = ("message", "batching-sink")


class AnswerSink(BatchingSink):
    """Answers a whole checkpoint's queries with one encoder call, then produces the answers."""

    def __init__(self, cfg: JobConfig, model, index: PassageIndex, status: Status):
        super().__init__()
        self.cfg, self.model, self.index, self.status = cfg, model, index, status
        self.producer: Producer | None = None

    def setup(self):
        self.producer = Producer({"bootstrap.servers": self.cfg.bootstrap, "linger.ms": 2, "acks": "all"})

    def write(self, batch: SinkBatch):  # flush() below takes every partition's batch at once
        raise NotImplementedError

    def flush(self):
        try:
            items = [item for batch in self._batches.values() for item in batch]
            queries = [q for q in (rag_job.decode_query(i.value) for i in items) if q is not None]
            for qid, body in rag_job.answer_batch(self.model, self.index, queries, self.cfg.top_k, self.cfg.min_score):
                self.producer.produce(self.cfg.answers_topic, body, key=qid.encode())
            self.producer.flush()  # durable before the checkpoint commits the offsets: at-least-once
            self.status.update(answered=len(queries), skipped=len(items) - len(queries))
        finally:
            self._batches.clear()


class IndexSink(BatchingSink):
    """Encodes and indexes a whole checkpoint's documents with one encoder call."""

    def __init__(self, model, index: PassageIndex, status: Status):
        super().__init__()
        self.model, self.index, self.status = model, index, status

    def write(self, batch: SinkBatch):
        raise NotImplementedError

    def flush(self):
        try:
            items = [item for batch in self._batches.values() for item in batch]
            docs = [d for d in (rag_job.decode_document(i.value) for i in items) if d is not None]
            self.status.update(indexed=rag_job.index_batch(self.model, self.index, docs),
                               skipped=len(items) - len(docs))
        finally:
            self._batches.clear()


def build_app(cfg: JobConfig, model, index: PassageIndex, status: Status) -> Application:
    batching = cfg.variant == "batching-sink"
    app = Application(
        broker_address=cfg.bootstrap,
        consumer_group=cfg.group,
        auto_offset_reset="earliest",  # fresh topics: Tansu's reported end offsets are not the true end
        auto_create_topics=False,  # the bench creates the topics; Tansu's DescribeConfigs returns nothing
        use_changelog_topics=False,  # stateless job
        commit_interval=cfg.batch_timeout_ms / 1e3 if batching else 5.0,
        commit_every=cfg.batch_max if batching else 0,
        # a checkpoint closes only between polls: a poll that waits its default 1 s for a next
        # record holds the batch, and in a closed loop no next record comes until the answers go out
        consumer_poll_timeout=cfg.batch_timeout_ms / 1e3 if batching else 1.0,
        consumer_extra_config={"session.timeout.ms": cfg.session_timeout_ms, "heartbeat.interval.ms": 1000,
                               "fetch.wait.max.ms": cfg.fetch_max_wait_ms},
        producer_extra_config={"linger.ms": 2},
        loglevel="WARNING",
    )
    queries = app.topic(cfg.queries_topic, value_deserializer="bytes", key_deserializer="bytes")
    answers = app.topic(cfg.answers_topic, value_serializer="bytes", key_serializer="bytes")
    documents = app.topic(cfg.documents_topic, value_deserializer="bytes", key_deserializer="bytes")

    if batching:
        app.dataframe(queries).sink(AnswerSink(cfg, model, index, status))
        app.dataframe(documents).sink(IndexSink(model, index, status))
        return app

    def answer_one(raw: bytes):
        query = rag_job.decode_query(raw)
        if query is None:
            status.update(skipped=1)
            return None
        [(_, body)] = rag_job.answer_batch(model, index, [query], cfg.top_k, cfg.min_score)
        status.update(answered=1)
        return body

    def index_one(raw: bytes):
        doc = rag_job.decode_document(raw)
        if doc is None:
            status.update(skipped=1)
            return
        status.update(indexed=rag_job.index_batch(model, index, [doc]))

    app.dataframe(queries).apply(answer_one).filter(lambda body: body is not None).to_topic(answers)
    app.dataframe(documents).update(index_one)
    return app


def main() -> None:
    cfg = rag_job.parse_args(__doc__.splitlines()[0], VARIANTS)
    logging.basicConfig(level=logging.WARNING)
    model = rag_job.load_minilm(cfg.torch_threads, cfg.precision)
    rag_job.encode(model, ["warm up"])  # the first call pays for lazy initialisation
    index = PassageIndex()
    status = Status(cfg.status, f"quix-{cfg.variant}")
    build_app(cfg, model, index, status).run()


if __name__ == "__main__":
    main()
