"""Safe evolution on the real parts: records written against the released schemas, through a worker over TCP."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import jsonschema
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Answer, decode
from tests.conftest import read_topic, run
from tests.unit.test_dashboard import PROMETHEUS_OWN, dashboard_exprs, queried_metrics, served_metric_names

pytestmark = pytest.mark.integration
RELEASED = Path(__file__).resolve().parent / "released"

# what a client built against a later minor revision sends: fields this version does not know
NEWER_DOCUMENT = {"doc_id": "newer-1", "text": "Paging moves fixed-size pages between memory and disk.",
                  "language": "en", "acl": {"read": ["all"]}}
NEWER_QUERY = {"query_id": "q-newer", "text": "What does paging move?", "priority": 3, "trace": {"id": "t-1"}}


def released_records(message: str) -> list[dict]:
    """What clients of every released version of ``message`` (e.g. "query") wrote."""
    out = []
    for path in sorted(RELEASED.glob("examples.v*.json")):
        for stem, records in json.loads(path.read_text()).items():
            if stem.split(".v")[0] == message:
                out += records
    return out


async def _publish(settings, topic: str, records: list[dict], key_field: str) -> None:
    async with AsyncClient(settings) as c:
        for rec in records:
            await c.publish_raw(topic, orjson.dumps(rec), key=rec[key_field].encode())


def test_released_and_newer_records_are_all_accepted_by_the_worker(make_settings, make_worker):
    """Documents and queries as v1 clients wrote them (minimal, full, without schema_version), and a newer
    client's with fields this version does not know, go through a worker: every document is indexed, every
    query answered, nothing dead-lettered. The answers validate against the released answer schema (a v1
    consumer reads them), and every metric the dashboard queries is on this worker's /metrics."""
    docs, queries = released_records("document"), released_records("query")
    docs.append(NEWER_DOCUMENT)
    queries.append(NEWER_QUERY)
    settings = make_settings()
    worker = make_worker(settings)
    topology = settings.topology

    run(_publish(settings, topology["documents"].name, docs, "doc_id"))
    worker.wait_ready(min_rows=len(docs))
    run(_publish(settings, topology["queries"].name, queries, "query_id"))
    records = run(read_topic(settings, topology["answers"].name, expect=len(queries)))

    answer_v1 = jsonschema.Draft202012Validator(json.loads((RELEASED / "answer.v1.json").read_text()))
    answered = {}
    for r in records:
        answer_v1.validate(orjson.loads(r.value))
        ans = decode(Answer, r.value, max_bytes=1 << 20)
        assert r.key.decode() == ans.query_id
        answered[ans.query_id] = ans
    assert set(answered) == {q["query_id"] for q in queries}
    assert answered["q-newer"].sources, "the newer client's document was indexed and found"
    for logical in ("documents", "queries"):
        letters = run(read_topic(settings, topology[logical].dlq, expect=1, timeout_s=3))
        assert letters == [], [orjson.loads(r.value)["reason"] for r in letters]

    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10) as resp:
        served = served_metric_names(text_string_to_metric_families(resp.read().decode()))
    missing = queried_metrics(dashboard_exprs()) - PROMETHEUS_OWN - served
    assert not missing, f"the dashboard queries metrics this worker does not serve: {sorted(missing)}"
