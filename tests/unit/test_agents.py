"""Every agent in memory, through Faust's ``agent.test_context()``.

The runtime (models, Milvus, Redis) is a fake that records what the agent asked
of it, and each outgoing topic's ``send`` is replaced by one that records the
record; the real-broker tests in ``tests/integration`` run the same agents
against Kafka, Milvus Lite and Redis.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from hybridrag.agents import (answer_queries, app, apply_retention_updates, index_generated, ingest_documents,
                              learn_from_generated, stream_processor, synthesize_documents)
from hybridrag.agents.kafka.schemas import (Answer, DeadLetter, Document, GeneratedDocument, Query, RetentionUpdate,
                                            decode, encode)
from hybridrag.agents.settings import Settings


class FakeRuntime:
    """What the agents need of :class:`hybridrag.agents.runtime.Runtime`, run inline and recorded."""

    def __init__(self, settings: Settings, encoder_kind: str = "original"):
        self.settings = settings
        self.memory = None
        self.reindex = None
        self.ingested: list = []
        self.indexed_generated: list = []
        self.answered: list = []
        encoder = SimpleNamespace(version="minilm-l6-v2", encode=lambda texts: [[0.0]] * len(texts))
        query = SimpleNamespace(answer_batch=self._answer_batch)
        self.serving = SimpleNamespace(encoder=encoder, store=SimpleNamespace(name="c1"), query=query,
                                       encoder_kind=encoder_kind, checkpoint="")
        self.encoder = encoder

    async def ready(self, app):
        return self

    async def run(self, fn, *args, lane: str = "query"):
        return fn(*args)

    def ingest_documents(self, docs):
        self.ingested.extend(docs)
        return SimpleNamespace(documents=len(docs), chunks=len(docs), rows=[], timings_ms={})

    def index_generated(self, docs):
        self.indexed_generated.extend(docs)
        return [d.doc_id for d in docs]

    def _answer_batch(self, queries, waits):
        self.answered.extend(queries)
        return [Answer(query_id=q.query_id, answer=f"about {q.text}", sources=[], confident=False,
                       encoder_version="minilm-l6-v2", generator="extractive", timings_ms={}, batch_size=len(queries))
                for q in queries]


class Sent:
    """A topic's ``send`` that records ``(key, value)`` and returns a resolved delivery future."""

    def __init__(self):
        self.records: list[tuple[bytes, bytes]] = []

    async def __call__(self, key=None, value=None, **kw):
        self.records.append((key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


@pytest.fixture
def settings():
    return Settings(retry_attempts=1, retry_backoff_s=0.0, ingest_batch_timeout_s=0.05, query_batch_timeout_s=0.05,
                    synth_batch_timeout_s=0.05)


@pytest.fixture
def sent(monkeypatch):
    """The records each outgoing topic received, by topic name (dead-letter topics included)."""
    out: dict[str, Sent] = {}
    topics = [app.answers_topic, app.generated_topic, app.retention_topic, *app.dead_letter_topics.values()]
    for topic in topics:
        out[topic.get_topic_name()] = Sent()
        monkeypatch.setattr(topic, "send", out[topic.get_topic_name()])
    return out


def use(monkeypatch, module, rt: FakeRuntime) -> None:
    """Point ``module``'s agent (and the shared stream processor) at the fake runtime and its settings."""
    monkeypatch.setattr(module, "runtime", rt)
    monkeypatch.setattr(module, "settings", rt.settings, raising=False)
    monkeypatch.setattr(stream_processor, "settings", rt.settings)


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for the agent")
        await asyncio.sleep(0.02)


async def test_ingest_documents_indexes_documents_and_dead_letters_a_bad_record(monkeypatch, settings, sent):
    """A valid document reaches the ingest lane; a malformed record goes to documents.dlq as a validation error."""
    rt = FakeRuntime(settings)
    use(monkeypatch, ingest_documents, rt)
    dlq = sent[app.topology["documents"].dlq]
    async with ingest_documents.ingest_documents.test_context() as agent:
        await agent.put(encode(Document(doc_id="d1", text="hello world")), key=b"d1", wait=False)
        await agent.put(b"not json", key=b"bad", wait=False)
        await until(lambda: rt.ingested and dlq.records)
    assert [d.doc_id for d in rt.ingested] == ["d1"]
    letter = DeadLetter.model_validate_json(dlq.records[0][1])
    assert letter.error_type == "validation" and letter.original() == b"not json"


async def test_answer_queries_publishes_one_answer_per_query(monkeypatch, settings, sent):
    """Each query's answer goes to ``answers``, keyed by its query id."""
    rt = FakeRuntime(settings)
    use(monkeypatch, answer_queries, rt)
    answers = sent[app.answers_topic.get_topic_name()]
    async with answer_queries.answer_queries.test_context() as agent:
        for i in range(3):
            await agent.put(encode(Query(query_id=f"q{i}", text=f"question {i}")), key=f"q{i}".encode(), wait=False)
        await until(lambda: len(answers.records) == 3)
    assert sorted(k for k, _ in answers.records) == [b"q0", b"q1", b"q2"]
    assert decode(Answer, answers.records[0][1], max_bytes=1 << 20).answer.startswith("about question")


async def test_answer_queries_hands_each_records_kafka_position_to_the_memory(monkeypatch, settings, sent):
    """The memory manager counts a query's hits under its record's (group, topic, partition, offset),
    in offset order: that position is what makes a replayed record count once."""
    rt = FakeRuntime(settings)
    recorded = []
    rt.memory = SimpleNamespace(record_hits_many=lambda batch: recorded.extend((p, q) for _, p, q in batch))
    use(monkeypatch, answer_queries, rt)
    async with answer_queries.answer_queries.test_context() as agent:
        for i in range(3):
            await agent.put(encode(Query(query_id=f"q{i}", text=f"question {i}")), key=f"q{i}".encode(), wait=False)
        await until(lambda: len(recorded) == 3)
    assert [q for _, q in recorded] == ["question 0", "question 1", "question 2"]
    assert [p.offset for p, _ in recorded] == sorted(p.offset for p, _ in recorded)
    assert len({p.offset for p, _ in recorded}) == 3
    assert {(p.group, p.topic) for p, _ in recorded} == {(settings.app_id, app.topology["queries"].name)}


async def test_answer_queries_dead_letters_a_query_that_keeps_failing(monkeypatch, settings, sent):
    """A query the pipeline cannot answer is dead-lettered as a processing error, not lost or retried forever."""
    rt = FakeRuntime(settings)

    def broken(queries, waits):
        raise ValueError("no answer")

    rt.serving.query.answer_batch = broken
    use(monkeypatch, answer_queries, rt)
    dlq = sent[app.topology["queries"].dlq]
    async with answer_queries.answer_queries.test_context() as agent:
        await agent.put(encode(Query(query_id="q1", text="why")), key=b"q1", wait=False)
        await until(lambda: dlq.records)
    letter = DeadLetter.model_validate_json(dlq.records[0][1])
    assert letter.error_type == "processing" and "no answer" in letter.reason


def _generated(doc_id: str, kept: bool = True, text: str = "a synthetic passage") -> GeneratedDocument:
    return GeneratedDocument(query_id="q1", query="what", doc_id=doc_id, text=text, kept=kept,
                             encoder_version="minilm-l6-v2", scores={"query_similarity": 0.8})


async def test_synthesize_documents_publishes_the_samples_of_sampled_queries(monkeypatch, settings, sent):
    """With every query sampled, the synthesizer's samples for it go to ``generated-documents``."""
    rt = FakeRuntime(settings.model_copy(update={"synth_sample_rate": 1.0}))
    use(monkeypatch, synthesize_documents, rt)
    monkeypatch.setattr(synthesize_documents, "synthesize",
                        lambda rt, queries: [_generated(f"synth:{q.query_id}:text:0") for q in queries])
    generated = sent[app.generated_topic.get_topic_name()]
    async with synthesize_documents.synthesize_documents.test_context() as agent:
        await agent.put(encode(Query(query_id="q1", text="what is a compiler")), key=b"q1", wait=False)
        await until(lambda: generated.records)
    assert generated.records[0][0] == b"q1"
    assert decode(GeneratedDocument, generated.records[0][1], max_bytes=1 << 20).doc_id == "synth:q1:text:0"


def test_sampling_is_stable_per_query_id():
    assert synthesize_documents.sampled("q1", 0.5) == synthesize_documents.sampled("q1", 0.5)
    assert not synthesize_documents.sampled("q1", 0.0)
    assert synthesize_documents.sampled("q1", 1.0)


async def test_index_generated_indexes_only_kept_documents_with_text(monkeypatch, settings, sent):
    """Dropped samples and embedding-only samples are not indexed."""
    rt = FakeRuntime(settings)
    use(monkeypatch, index_generated, rt)
    async with index_generated.index_generated.test_context() as agent:
        for doc in (_generated("g-kept"), _generated("g-dropped", kept=False), _generated("g-empty", text="")):
            await agent.put(encode(doc), key=b"q1", wait=False)
        await until(lambda: rt.indexed_generated)
        await asyncio.sleep(0.2)  # the rest of the batch, had it been indexed
    assert [d.doc_id for d in rt.indexed_generated] == ["g-kept"]


async def test_learn_from_generated_buffers_examples_for_the_hybrid_encoder(monkeypatch, settings, sent):
    """Generated documents reach the learner's buffer when the worker serves the hybrid encoder."""
    rt = FakeRuntime(settings.model_copy(update={"learner_enabled": True, "learner_min_examples": 1000}),
                     encoder_kind="hybrid")
    learner = learn_from_generated.Learner(rt)
    buffered: list = []

    def buffer_examples(docs):
        buffered.extend(docs)
        return len(buffered)

    monkeypatch.setattr(learner, "buffer_examples", buffer_examples)
    use(monkeypatch, learn_from_generated, rt)
    monkeypatch.setattr(learn_from_generated, "learner", learner)
    async with learn_from_generated.learn_from_generated.test_context() as agent:
        await agent.put(encode(_generated("g1")), key=b"q1", wait=False)
        await until(lambda: buffered)
    assert [d.doc_id for d in buffered] == ["g1"]
    assert learner.task is None  # fewer than learner_min_examples: no update yet


async def test_learn_from_generated_is_idle_on_the_original_encoder(monkeypatch, settings, sent):
    """The learner fine-tunes the hybrid encoder only; serving MiniLM, nothing is buffered."""
    rt = FakeRuntime(settings.model_copy(update={"learner_enabled": True}))
    learner = learn_from_generated.Learner(rt)
    assert not learner.active()
    await learner.take([])  # nothing to do, nothing raised


async def test_apply_retention_updates_reindexes_on_a_promoted_encoder(monkeypatch, settings, sent):
    """A promotion rebuilds the collection, swaps it in and publishes ``reindexed``."""
    rt = FakeRuntime(settings)
    rebuild = SimpleNamespace(total=3, done=False, progress=lambda: {"seconds": 0.1})

    def copy_slice():
        rebuild.done = True

    rebuild.copy_slice = copy_slice
    calls: list = []
    rt.start_reindex = lambda kind, checkpoint, version: (calls.append((kind, checkpoint, version)), (rebuild, "t"))[1]
    rt.finish_reindex = lambda rb, target: (3, 3)
    rt.abort_reindex = lambda: None
    use(monkeypatch, apply_retention_updates, rt)
    updates = sent[app.retention_topic.get_topic_name()]
    promoted = RetentionUpdate(kind="encoder-promoted", encoder_version="hybrid-v2", checkpoint="/tmp/v2.pt")
    async with apply_retention_updates.apply_retention_updates.test_context() as agent:
        await agent.put(encode(promoted), key=b"hybrid-v2", wait=False)
        await until(lambda: updates.records)
    assert calls == [("hybrid", "/tmp/v2.pt", "hybrid-v2")]
    done = decode(RetentionUpdate, updates.records[0][1], max_bytes=1 << 20)
    assert done.kind == "reindexed" and done.metrics["rows"] == 3.0
