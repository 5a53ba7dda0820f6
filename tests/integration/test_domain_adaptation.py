"""Zero-shot domain adaptation in the service, on the real broker, Redis and Milvus Lite:
ingested passages -> the adapter's Redis buffer -> a conv-branch adaptation in a low-priority
subprocess -> the canary gate -> retention-updates -> re-index and alias swap -> the adapted
version answers, and no query fails on the way."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import RetentionUpdate, decode
from tests.conftest import read_topic, run
from tests.integration.test_end_to_end import demo_docs, demo_questions

pytestmark = pytest.mark.integration


def test_the_passage_buffer_counts_a_passage_once_and_keeps_the_newest(redis_url, tmp_path):
    """Passages arrive twice (a Kafka replay) and beyond the bound: each counts once, the oldest go,
    and the corpus it writes is what an adaptation reads."""
    from hybridrag.agents.retention.domain_adaptation import Corpus, PassageBuffer

    prefix = f"test-{uuid.uuid4().hex[:10]}"
    buf = PassageBuffer(redis_url, prefix, max_passages=3)
    try:
        assert buf.add([("a", "A", "first passage"), ("b", "", "second passage")]) == 2
        assert buf.add([("a", "A", "first passage"), ("c", "", "third"), ("d", "", "fourth")]) == 4
        assert buf.consume(4) == 0 and buf.pending() == 0
        path = tmp_path / "corpus.jsonl"
        assert buf.write_corpus(path) == 3
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["_id"] for r in rows] == ["b", "c", "d"]
        corpus = Corpus.from_jsonl(path)
        assert corpus.texts == ["second passage", "third", "fourth"]
    finally:
        buf.clear()
        assert not redis.Redis.from_url(redis_url).keys(f"{prefix}:*")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a model trains, is scored twice on the canary and re-indexes, on a shared CPU
def test_the_service_adapts_to_its_corpus_after_ingest_and_swaps(make_settings, make_worker):
    """A hybrid-encoder worker ingests 60 demo passages (the trigger is 40). The adapter trains a
    conv branch for a few seconds in a subprocess, the canary (tolerance that admits it) promotes it,
    the worker re-indexes and swaps. A client asks questions the whole time: every one is answered,
    and the last ones by the adapted version."""
    settings = make_settings(encoder="hybrid", learner_adapt_after=40, learner_adapt_minutes=0.05,
                             learner_canary_queries=20, learner_canary_tolerance=1.0)
    worker = make_worker(settings)
    before = worker.health()["encoder_version"]
    docs = demo_docs(60)
    questions = [q["question"] for q in demo_questions()]
    retention = settings.topology["retention-updates"].name

    async def go():
        async with AsyncClient(settings) as c:
            await c.publish_documents(docs)
            await asyncio.to_thread(worker.wait_ready, min_rows=len(docs), timeout_s=600)
            answers, updates = [], []
            deadline = time.monotonic() + 1500
            while not any(u.kind == "reindexed" for u in updates) and time.monotonic() < deadline:
                # a shared CPU makes answers slow while the adaptation trains; slow is not failed
                answers.append(await c.ask(questions[len(answers) % len(questions)], timeout_s=300))
                records = await read_topic(settings, retention, expect=2, timeout_s=2)
                updates = [decode(RetentionUpdate, r.value, max_bytes=1 << 20) for r in records]
                if any(u.kind == "encoder-rejected" for u in updates):
                    break
                await asyncio.sleep(1.0)
            after = await c.ask(questions[0], timeout_s=300)
        return answers, updates, after

    answers, updates, after = run(go())
    kinds = [u.kind for u in updates]
    assert kinds[:2] == ["encoder-promoted", "reindexed"], (kinds, [u.detail for u in updates], worker.log_tail())
    promoted = updates[0]
    assert promoted.detail.startswith("domain adaptation promoted"), promoted.detail
    assert promoted.encoder_version != before and promoted.checkpoint.endswith(".pt")
    assert {"canary_base", "canary_new", "self_check_pairs", "steps"} <= set(promoted.metrics)
    assert promoted.metrics["passages"] >= 60 and promoted.metrics["steps"] >= 1
    assert len(answers) >= 2 and all(a.answer for a in answers)  # asked throughout; none failed
    assert after.encoder_version == promoted.encoder_version
    assert worker.health()["encoder_version"] == promoted.encoder_version
