"""The synthesizer and the synthetic indexer as agents, on the real parts: Tansu, Milvus Lite,
MiniLM, the shipped diffusion checkpoints and a worker process."""

from __future__ import annotations

import time

import orjson
import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Answer, GeneratedDocument, decode, encode
from tests.conftest import read_topic, run
from tests.integration.test_end_to_end import demo_docs, demo_questions, publish

pytestmark = pytest.mark.integration


def test_sampled_queries_produce_generated_documents_with_provenance(make_settings, make_worker):
    """With every query sampled, each question is answered as usual and, beside the answer
    path, both diffusion models write samples for it to ``generated-documents``: one record
    per sample, kept or dropped, with the query it answers, the model versions, the encoder
    version and the filter scores, and the reasons for every drop."""
    settings = make_settings(synth_sample_rate=1.0, synth_samples=2, synth_text_steps=8)
    worker = make_worker(settings)
    docs = demo_docs(60)
    run(publish(settings, docs))
    worker.wait_ready(min_rows=len(docs))
    questions = [q["question"] for q in demo_questions()[:3]]

    async def ask():
        async with AsyncClient(settings) as c:
            return await c.ask_many(questions, timeout_s=120)

    answers = run(ask())
    assert len(answers) == len(questions)
    expect = len(questions) * 2 * 2  # two samples from each of the two models
    records = run(read_topic(settings, settings.topology["generated-documents"].name, expect, timeout_s=180))
    generated = [decode(GeneratedDocument, r.value, max_bytes=1 << 20) for r in records]
    assert len(generated) == expect, worker.log_tail()
    by_query = {}
    for g in generated:
        by_query.setdefault(g.query_id, []).append(g)
        assert g.query in questions
        assert g.encoder_version == answers[0].encoder_version
        assert set(g.model_versions) <= {"text", "embedding"} and all(g.model_versions.values())
        assert "query_similarity" in g.scores
        assert g.kept == (not g.drop_reasons)
        assert len(g.embedding) == 384
        assert g.doc_id.startswith(f"synth:{g.query_id}:")
    assert set(by_query) == {a.query_id for a in answers}
    assert {g.doc_id for g in generated}.__len__() == expect  # one id per sample


def test_kept_synthetic_documents_are_indexed_and_never_cited(make_settings, make_worker):
    """A kept generated document is indexed with ``synthetic=true``; a query that matches it
    best is answered from real documents only. A dropped one and an embedding-only one are
    not indexed, and a malformed record goes to the dead-letter topic with its reason."""
    settings = make_settings()
    worker = make_worker(settings)
    docs = demo_docs(40)
    run(publish(settings, docs))
    rows = worker.wait_ready(min_rows=len(docs))["rows"]
    synthetic_text = "The quantum flux capacitor of the Zorblax compiler rewrites every loop into a spiral."
    topic = settings.topology["generated-documents"].name

    def gen(doc_id: str, kept: bool, text: str) -> GeneratedDocument:
        return GeneratedDocument(query_id="q-synthetic", query="what does the Zorblax compiler do", doc_id=doc_id,
                                 text=text, kept=kept, drop_reasons=[] if kept else ["off_topic"],
                                 scores={"query_similarity": 0.6}, model_versions={"text": "test"},
                                 encoder_version="another-encoder")

    async def go():
        async with AsyncClient(settings) as c:
            await c.publish_raw(topic, encode(gen("synth:q-synthetic:text:0", True, synthetic_text)), key=b"q")
            await c.publish_raw(topic, encode(gen("synth:q-synthetic:text:1", False, "dropped text")), key=b"q")
            await c.publish_raw(topic, encode(gen("synth:q-synthetic:embedding:0", True, "")), key=b"q")
            await c.publish_raw(topic, b'{"query_id": "q", "kept": "yes"}', key=b"q")

    run(go())
    worker.wait_ready(min_rows=rows + 1)
    time.sleep(2)  # the other records of that batch had their chance to be (wrongly) indexed
    assert worker.health()["rows"] == rows + 1

    async def ask():
        async with AsyncClient(settings) as c:
            return await c.ask("What does the Zorblax compiler's quantum flux capacitor do to loops?", timeout_s=60)

    answer: Answer = run(ask())
    assert all(not s.doc_id.startswith("synth:") for s in answer.sources)
    dlq = run(read_topic(settings, f"{topic}.dlq", expect=1, timeout_s=30))
    assert len(dlq) == 1 and "wrong schema" in orjson.loads(dlq[0].value)["reason"]
