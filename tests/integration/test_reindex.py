"""Re-indexing without stale vectors: a promoted encoder rebuilds the collection and the alias swaps
while queries flow, on the real parts (Tansu, Milvus Lite, MiniLM and the hybrid encoder, a worker process)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.models.encoders import load_encoder
from hybridrag.agents.rag.chunking import embed_text
from hybridrag.agents.kafka.schemas import RetentionUpdate, decode, encode
from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT
from tests.conftest import read_topic, run
from tests.integration.test_end_to_end import demo_docs, demo_questions, publish

pytestmark = pytest.mark.integration


def test_promotion_swaps_the_alias_while_queries_flow(make_settings, make_worker):
    """A worker serves MiniLM over 300 documents while a client asks a question every 50 ms.
    An ``encoder-promoted`` event names the hybrid encoder: the worker re-encodes the corpus
    into the hybrid's collection and swaps the alias. Every query is answered; each answer's
    scores are those of the encoder it names over that encoder's own vectors (no batch mixes
    versions); once the hybrid answers, MiniLM never answers again; and a restarted worker
    serves the promoted version, whatever HYBRIDRAG_ENCODER says."""
    settings = make_settings(encoder="original", reindex_batch=64)
    worker = make_worker(settings)
    docs = demo_docs()
    run(publish(settings, docs))
    rows = worker.wait_ready(min_rows=len(docs))["rows"]  # chunks: a long document has several
    hybrid = load_encoder("hybrid", checkpoint=str(DEFAULT_CHECKPOINT))
    original = load_encoder("original")
    questions = [q["question"] for q in demo_questions()]
    retention_topic = settings.topology["retention-updates"].name

    async def scenario():
        answers, reindexed = [], []
        async with AsyncClient(settings) as c:
            async def ask_loop(stop: asyncio.Event):
                i = 0
                while not stop.is_set():
                    answers.extend(await c.ask_many([questions[i % len(questions)]], timeout_s=120))
                    i += 1
                    await asyncio.sleep(0.05)

            stop = asyncio.Event()
            asker = asyncio.create_task(ask_loop(stop))
            await asyncio.sleep(2.0)
            promoted = RetentionUpdate(kind="encoder-promoted", encoder_version=hybrid.version,
                                       checkpoint=str(DEFAULT_CHECKPOINT), detail="test")
            await c.publish_raw(retention_topic, encode(promoted), key=hybrid.version.encode())
            deadline = time.monotonic() + 300
            while not reindexed and time.monotonic() < deadline:
                records = await read_topic(settings, retention_topic, expect=2, timeout_s=5)
                reindexed = [u for r in records if (u := decode(RetentionUpdate, r.value, max_bytes=1 << 20)).kind == "reindexed"]
            await asyncio.sleep(2.0)  # queries after the swap
            stop.set()
            await asker
        return answers, reindexed

    answers, reindexed = run(scenario())
    assert reindexed, f"no reindexed event\n{worker.log_tail()}"
    assert reindexed[0].encoder_version == hybrid.version
    assert reindexed[0].metrics["rows"] == rows

    versions = [a.encoder_version for a in sorted(answers, key=lambda a: a.answered_at)]
    assert set(versions) == {original.version, hybrid.version}, set(versions)
    first_hybrid = versions.index(hybrid.version)
    assert all(v == hybrid.version for v in versions[first_hybrid:]), "an old-version answer after the swap"
    assert all(a.confident and a.sources for a in answers)

    # the scores an answer reports are its encoder's cosine over its encoder's vectors
    encoders = {original.version: original, hybrid.version: hybrid}
    q_vecs = {v: enc.encode(questions) for v, enc in encoders.items()}
    def score_error(a, version: str) -> float:
        """How far the answer's scores are from ``version``'s cosines (for the best-matching question)."""
        src_vecs = encoders[version].encode([embed_text(s.title, s.text) for s in a.sources])
        scores = np.array([s.score for s in a.sources], dtype=np.float32)
        # the query text is not in the answer: take the question whose cosines match best
        return float(np.abs(q_vecs[version] @ src_vecs.T - scores[None]).max(axis=1).min())

    for a in answers[:: max(1, len(answers) // 40)] + answers[-5:]:
        other = next(v for v in encoders if v != a.encoder_version)
        right, wrong = score_error(a, a.encoder_version), score_error(a, other)
        # dynamic INT8 scales activations per batch, so the hybrid's cosines move a little with batch mates
        assert right < 0.05 and wrong > 3 * right, (a.encoder_version, right, wrong)

    h = worker.health()
    assert h["encoder_version"] == hybrid.version and h["rows"] == rows
    worker.stop()
    worker.start()
    assert worker.health()["encoder_version"] == hybrid.version
