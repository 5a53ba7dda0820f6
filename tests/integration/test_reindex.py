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


def _legacy_collection(uri: str, name: str, dim: int, texts: list[str], vectors: np.ndarray) -> None:
    """A collection as stores made them before the lexical index: vectors and text, no BM25 function."""
    from pymilvus import DataType, MilvusClient

    c = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=300)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for field, kw in (("doc_id", {"max_length": 256}), ("text", {"max_length": 65535}), ("title", {"max_length": 1024}),
                      ("tenant", {"max_length": 64}), ("encoder_version", {"max_length": 128})):
        schema.add_field(field, DataType.VARCHAR, **kw)
    schema.add_field("chunk", DataType.INT64)
    schema.add_field("synthetic", DataType.BOOL)
    schema.add_field("indexed_at", DataType.DOUBLE)
    schema.add_field("hubness", DataType.FLOAT)
    index = c.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    c.create_collection(name, schema=schema, index_params=index)
    c.alter_collection_properties(name, properties={"hybridrag.encoder": "original",
                                                    "hybridrag.encoder_version": "minilm-l6-v2",
                                                    "hybridrag.dim": str(dim)})
    c.insert(name, [{"id": f"d{i}#0", "vector": v.tolist(), "doc_id": f"d{i}", "text": t, "title": "", "tenant": "",
                     "encoder_version": "minilm-l6-v2", "chunk": 0, "synthetic": False, "indexed_at": 0.0,
                     "hubness": 0.0} for i, (t, v) in enumerate(zip(texts, vectors))])
    c.close()


def test_a_collection_without_the_lexical_index_is_rebuilt_beside_itself(tmp_path, caplog):
    """A collection from before the lexical index serves dense search only and says so in the log; the
    re-index for the same encoder builds a second collection (a new generation) with the BM25 index, and
    after the alias swap a BM25 search finds a row by a word only it holds."""
    from hybridrag.agents.rag.reindex import Reindex
    from hybridrag.agents.rag.store import VectorStore, collection_name, resolve_serving

    uri = str(tmp_path / "old.db")
    enc = load_encoder("original")
    texts = [f"Passage {i} is about nothing in particular." for i in range(30)] + ["The quuxolator calibrates lenses."]
    _legacy_collection(uri, collection_name("c", enc.version), enc.dim, texts, enc.encode(texts))
    with caplog.at_level("WARNING"):
        old = VectorStore(uri, "c", enc.version, enc.dim)
    assert not old.has_lexical and "no lexical (BM25) index" in caplog.text and "hybridrag reindex" in caplog.text
    assert old.lexical_search(["quuxolator"], 5) == [[]]
    old.point_alias()
    new = VectorStore(uri, "c", enc.version, enc.dim, generation="g1")
    assert new.name != old.name and new.has_lexical
    rebuild = Reindex(old, new, enc, batch=8)
    while not rebuild.done:
        rebuild.copy_slice()
    assert rebuild.verify() == (31, 31)
    new.point_alias()
    assert resolve_serving(uri, "c", client=new.client).collection == new.name
    assert [h.doc_id for h in new.lexical_search(["quuxolator"], 5)[0]] == ["d30"]
    old.close()
    new.close()
