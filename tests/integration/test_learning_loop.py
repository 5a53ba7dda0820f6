"""The loop that makes the service better while it runs, in one worker on the real parts:
generated documents -> the learner's Redis buffer -> a fine-tune in a subprocess -> the canary
gate -> retention-updates -> re-index -> the new version answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import GeneratedDocument, RetentionUpdate, decode, encode
from tests.conftest import read_topic, run
from tests.integration.test_end_to_end import demo_docs, demo_questions, publish

pytestmark = pytest.mark.integration


def generated_for(questions: list[str], docs) -> list[GeneratedDocument]:
    """Kept text samples as the synthesizer would publish them (one per question)."""
    return [
        GeneratedDocument(query_id=f"q{i}", query=q, doc_id=f"synth:q{i}:text:0", text=d.text[:400], kept=True,
                          scores={"query_similarity": 0.5}, model_versions={"text": "test"},
                          encoder_version="any")
        for i, (q, d) in enumerate(zip(questions, docs))
    ]


def test_generated_documents_fine_tune_promote_and_reindex(make_settings, make_worker):
    """A hybrid-encoder worker receives 12 kept generated documents (the trigger is 8). The
    learner buffers them, fine-tunes a copy of the encoder in a subprocess, scores it on the
    canary and, with a tolerance that admits it, publishes ``encoder-promoted`` with the new
    version and its checkpoint. The worker then re-indexes and answers with the new version.
    Replaying the same generated documents does not trigger a second update."""
    settings = make_settings(
        encoder="hybrid", learner_min_examples=8, learner_steps=2, learner_batch_size=4, learner_grad_accum=2,
        learner_canary_queries=20, learner_canary_tolerance=1.0,
    )
    worker = make_worker(settings)
    docs = demo_docs(60)
    run(publish(settings, docs))
    before = worker.wait_ready(min_rows=len(docs))
    questions = [q["question"] for q in demo_questions()]
    samples = generated_for((questions * 2)[:12], docs[:12])
    topic = settings.topology["generated-documents"].name
    retention = settings.topology["retention-updates"].name

    async def go():
        async with AsyncClient(settings) as c:
            for g in samples:
                await c.publish_raw(topic, encode(g), key=g.query_id.encode())
            updates: list[RetentionUpdate] = []
            deadline = time.monotonic() + 600
            while not any(u.kind == "reindexed" for u in updates) and time.monotonic() < deadline:
                records = await read_topic(settings, retention, expect=2, timeout_s=10)
                updates = [decode(RetentionUpdate, r.value, max_bytes=1 << 20) for r in records]
                if any(u.kind == "encoder-rejected" for u in updates):
                    break
            # the same records again: idempotent by doc_id, no second update
            for g in samples:
                await c.publish_raw(topic, encode(g), key=g.query_id.encode())
            await asyncio.sleep(8)
            final = [decode(RetentionUpdate, r.value, max_bytes=1 << 20)
                     for r in await read_topic(settings, retention, expect=10, timeout_s=5)]
            answer = await c.ask(questions[0], timeout_s=60)
        return updates, final, answer

    updates, final, answer = run(go())
    kinds = [u.kind for u in updates]
    assert kinds[:2] == ["encoder-promoted", "reindexed"], (kinds, worker.log_tail())
    promoted = updates[0]
    assert promoted.encoder_version != before["encoder_version"]
    assert promoted.checkpoint.endswith(".pt")
    assert {"canary_base", "canary_new", "steps"} <= set(promoted.metrics), promoted.metrics
    assert promoted.metrics["steps"] == 2
    assert worker.health()["encoder_version"].removesuffix("-int8") == promoted.encoder_version.removesuffix("-int8")
    assert answer.encoder_version.removesuffix("-int8") == promoted.encoder_version.removesuffix("-int8")
    assert [u.kind for u in final].count("encoder-promoted") == 1, [u.kind for u in final]
