"""Broker-side validation: Tansu checks every produced value against its topic's JSON Schema."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import Producer

from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker
from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.contract import write_broker_schemas
from hybridrag.agents.kafka.schemas import DeadLetter, Document, Query
from tests.conftest import read_topic, run

pytestmark = pytest.mark.integration


@pytest.fixture
def validating_broker(tmp_path):
    with EmbeddedBroker(log_path=tmp_path / "tansu.log", schema_registry=tmp_path / "registry") as b:
        yield b


def _produce_rdkafka(bootstrap: str, topic: str, records: list[bytes]) -> list:
    """librdkafka's delivery report of each record: None when stored, else the error."""
    reports: list = [None] * len(records)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i, value in enumerate(records):
        p.produce(topic, key=b"k%d" % i, value=value,
                  on_delivery=lambda err, msg, i=i: reports.__setitem__(i, err or "stored"))
        p.flush(15)  # one record per batch: Tansu refuses a batch whole
    return reports


def test_the_broker_refuses_records_that_fail_the_schema_and_the_worker_still_answers(
        validating_broker, make_settings, make_worker):
    """With the topics' schemas in Tansu's registry: a bad query is refused at produce time with INVALID_RECORD
    (librdkafka says so by name; aiokafka, which does not know code 87, raises UnknownError), it never reaches
    the worker; good queries, and a newer client's with an unknown field, are stored and answered, and the
    worker's own answers and dead letters pass the broker's validation too."""
    settings = make_settings(kafka_bootstrap_servers=validating_broker.bootstrap)
    write_broker_schemas(validating_broker.schema_registry, settings.topology)
    run(create_topics(settings))
    queries = settings.topology["queries"].name
    bad = [orjson.dumps({"query_id": "b1", "text": 7}), b"{not json", orjson.dumps({"query_id": "b 2", "text": "x"}),
           orjson.dumps({"query_id": "b3", "text": "   "}), orjson.dumps({"text": "no id"})]
    good = [orjson.dumps({"query_id": "g1", "text": "What is a compiler?"}),
            orjson.dumps({"query_id": "g2", "text": "What is a compiler?", "from_a_newer_client": 1})]
    reports = _produce_rdkafka(validating_broker.bootstrap, queries, bad + good)
    assert all(isinstance(r, RdKafkaError) and r.code() == RdKafkaError.INVALID_RECORD for r in reports[:len(bad)]), reports
    assert "failed to validate record" in reports[0].str()
    assert reports[len(bad):] == ["stored"] * len(good)

    async def aiokafka_produce_bad() -> KafkaError | None:
        async with AsyncClient(settings) as c:
            try:
                await c.publish_raw(queries, bad[0], key=b"b1")
            except KafkaError as e:
                return e
        return None

    err = run(aiokafka_produce_bad())
    assert err is not None and type(err).__name__ == "UnknownError"

    worker = make_worker(settings)
    too_long = Query(query_id="g3", text="x" * (settings.max_query_chars + 1))  # valid JSON Schema, over the limit

    async def ask():
        async with AsyncClient(settings) as c:
            await c.publish_documents([Document(doc_id="d1", text="A compiler translates source code to machine code.")])
            worker.wait_ready(min_rows=1)
            await c.publish_raw(queries, orjson.dumps(too_long.model_dump(mode="json")), key=b"g3")
            fut = await c.submit(Query(query_id="g4", text="What does a compiler translate?"))
            return await asyncio.wait_for(fut, 60)

    answer = run(ask())
    assert answer.query_id == "g4" and answer.sources
    answers = run(read_topic(settings, settings.topology["answers"].name, expect=3))
    assert {r.key for r in answers} == {b"g1", b"g2", b"g4"}
    [letter] = run(read_topic(settings, settings.topology["queries"].dlq, expect=1))
    assert "oversized text" in DeadLetter.model_validate(orjson.loads(letter.value)).reason
