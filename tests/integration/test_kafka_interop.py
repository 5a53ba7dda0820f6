"""Any Kafka client: the worker driven only through librdkafka (confluent-kafka), none of our client code.

A user on Java, Go or a shell has no ``hybridrag.agents.kafka.client``: they produce
JSON to ``documents`` and ``queries`` keyed by id, and consume ``answers`` and
``queries.dlq``, matching records by key. This test does exactly that with
librdkafka, the C client most non-JVM clients wrap (>= 2.16 speaks the protocol
versions the embedded Tansu broker expects; Debian's older librdkafka fails its
ApiVersion handshake). Only the worker's /health is read, to know when the
documents are indexed.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from hybridrag.agents.settings import RESOURCES

confluent_kafka = pytest.importorskip("confluent_kafka", reason="the test extra installs confluent-kafka")
pytestmark = pytest.mark.integration


def demo_records(n_questions: int = 3) -> tuple[list[dict], list[dict]]:
    """The first questions of the demo and a corpus that holds their answers among 40 passages."""
    questions = [json.loads(line) for line in (RESOURCES / "demo" / "questions.jsonl").read_text().splitlines() if line]
    questions = questions[:n_questions]
    corpus = [json.loads(line) for line in (RESOURCES / "demo" / "corpus.jsonl").read_text().splitlines() if line]
    wanted = {q["expected_doc_id"] for q in questions}
    docs = [d for d in corpus if d["_id"] in wanted] + [d for d in corpus if d["_id"] not in wanted][:40 - len(wanted)]
    return questions, docs


def assign_from_start(consumer, topics: list[str]) -> None:
    """Read every partition of ``topics`` from offset 0: the consumer is in place before anything is produced."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    meta = consumer.list_topics(timeout=10)
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in meta.topics[t].partitions])


def test_librdkafka_client_gets_answers_and_dead_letters_by_key(make_settings, make_worker):
    """Produce documents, three queries and one malformed query with librdkafka; consume with librdkafka:
    each query's answer arrives keyed by its query_id and cites the passage that answers it, and the
    malformed record arrives on queries.dlq under its own key with the reason."""
    from confluent_kafka import Consumer, Producer

    settings = make_settings()
    worker = make_worker(settings)  # creates the topics, then joins the group
    topo = settings.topology
    conf = {"bootstrap.servers": settings.kafka_bootstrap_servers, "broker.address.family": "v4"}
    assert confluent_kafka.libversion()[1] >= 0x02100000, confluent_kafka.libversion()

    consumer = Consumer({**conf, "group.id": f"interop-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    assign_from_start(consumer, [topo["answers"].name, topo["queries"].dlq])
    producer = Producer({**conf, "acks": "all", "enable.idempotence": False})
    try:
        questions, docs = demo_records()
        for d in docs:
            doc = {"doc_id": d["_id"], "title": d["title"], "text": d["text"]}
            producer.produce(topo["documents"].name, key=d["_id"], value=json.dumps(doc))
        assert producer.flush(30) == 0
        worker.wait_ready(min_rows=len(docs))

        run = uuid.uuid4().hex[:6]
        expected = {f"q-{run}-{i}": q for i, q in enumerate(questions)}
        for qid, q in expected.items():
            producer.produce(topo["queries"].name, key=qid, value=json.dumps({"query_id": qid, "text": q["question"]}))
        bad_key = f"bad-{run}"
        producer.produce(topo["queries"].name, key=bad_key, value=b'{"query_id": "oops", "text": ')
        assert producer.flush(30) == 0

        answers, dead = {}, {}
        deadline = time.monotonic() + 90
        while (len(answers) < len(expected) or bad_key not in dead) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            key = msg.key().decode()
            (answers if msg.topic() == topo["answers"].name else dead)[key] = json.loads(msg.value())
    finally:
        consumer.close()

    assert set(answers) == set(expected), (sorted(answers), worker.log_tail())
    for qid, q in expected.items():
        a = answers[qid]
        assert a["query_id"] == qid and a["confident"], a
        assert q["expected_doc_id"] in [s["doc_id"] for s in a["sources"]], (q, a["sources"])
    assert bad_key in dead, worker.log_tail()
    letter = dead[bad_key]
    assert letter["key"] == bad_key and letter["source_topic"] == topo["queries"].name
    assert letter["error_type"] and letter["reason"], letter
