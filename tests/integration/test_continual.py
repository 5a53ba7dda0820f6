"""The continual learner on the real Redis, the real Milvus Lite and the shipped hybrid checkpoint.

Each test gets its own uuid key prefix (removed afterwards) and its own data
directory; the fine-tune runs in a subprocess, as the worker runs it.
"""

from __future__ import annotations

import asyncio
import csv
import time
import uuid

import numpy as np
import pytest
import redis

from hybridrag.agents.retention.continual_learner import (
    Example,
    LearnerConfig,
    Replay,
    TrainingBuffer,
    gather_replay,
    run_update_in_subprocess,
    should_promote,
)
from hybridrag.agents.retention.memory_manager import DocRecord, MemoryConfig, MemoryManager
from hybridrag.agents.kafka.schemas import GeneratedDocument, RetentionUpdate, decode, encode
from hybridrag.agents.rag.store import Row, VectorStore
from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, HybridEncoderRuntime, load_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(redis_url):
    p = f"test-learn-{uuid.uuid4().hex[:10]}"
    yield p
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{p}:*"))
    if keys:
        client.delete(*keys)


def _gen(i: int, kept: bool = True, text: str | None = None) -> GeneratedDocument:
    return GeneratedDocument(query_id=f"q{i}", query=f"question number {i}", doc_id=f"gen-{i}",
                             text=f"an answer about topic {i}" if text is None else text, kept=kept,
                             encoder_version="hybrid-test")


def test_buffer_counts_a_replayed_record_once_and_loses_nothing_before_the_drop(redis_url, prefix):
    """Ten samples arrive, then the same ten again (a Kafka replay): ten count. Dropped and embedding-only
    samples are not pairs. A snapshot leaves the buffer as it was (a crash mid-update loses nothing, a
    new buffer object sees them); after the drop they are gone, and a replay of a trained record after
    the drop does not come back."""
    buf = TrainingBuffer(redis_url, prefix)
    msgs = [_gen(i) for i in range(10)]
    assert buf.add(msgs) == 20  # ten pairs and ten query-only examples
    assert buf.add(msgs) == 0
    assert buf.add([_gen(10, kept=False), _gen(11, text="")]) == 2  # only their queries
    assert buf.size() == 10 and buf.query_count() == 12

    snap = buf.snapshot(4, n_queries=2)
    assert [e.doc_id for e in snap] == ["gen-0", "gen-1", "gen-2", "gen-3", "query:q0", "query:q1"]
    assert snap[0] == Example("gen-0", "q0", "question number 0", "an answer about topic 0")
    after_crash = TrainingBuffer(redis_url, prefix)
    assert after_crash.size() == 10 and after_crash.snapshot(4, n_queries=2) == snap

    assert after_crash.drop([e.doc_id for e in snap]) == 6
    assert buf.size() == 6 and buf.query_count() == 10
    assert buf.add(msgs[:4]) == 0  # the trained records, replayed again
    assert buf.snapshot(1, n_queries=0)[0].doc_id == "gen-4"


def test_buffer_keeps_the_newest_examples_of_each_kind_within_its_bound(redis_url, prefix):
    """With room for 5 of each kind, 12 generated documents leave the newest 5 pairs and 5 queries
    (their texts too), and 12 trained ids leave the newest 10 remembered against replays."""
    buf = TrainingBuffer(redis_url, prefix, max_examples=5)
    assert buf.add([_gen(i) for i in range(8)]) == 16
    assert buf.add([_gen(i) for i in range(8, 12)]) == 8
    assert buf.sizes() == {"pairs": 5, "queries": 5, "done": 0}
    assert [e.doc_id for e in buf.snapshot(5, n_queries=0)] == [f"gen-{i}" for i in range(7, 12)]
    assert buf.client.hlen(buf.ns + "ex") == 10
    buf.drop([f"gen-{i}" for i in range(12)])
    assert buf.sizes() == {"pairs": 0, "queries": 5, "done": 10}


def test_replay_comes_from_the_memory_managers_important_real_documents(redis_url, prefix, tmp_path):
    """Three documents are indexed and cited by queries, one synthetic document is popular too: the replay
    holds the real documents' texts (most important first, the synthetic left out) and the query patterns
    paired with their cited documents; the most recently retrieved document is new data, and so is the
    pattern that cited it. A document the memory keeps no sample of is read from the store. An empty
    memory falls back to the base training corpus."""
    mem = MemoryManager(MemoryConfig(redis_url=redis_url, prefix=prefix))
    store = VectorStore(str(tmp_path / "m.db"), f"learn_{uuid.uuid4().hex[:8]}", "test", 4)
    try:
        rows = [Row(f"{d}#0", d, 0, t, np.eye(4, dtype=np.float32)[i]) for i, (d, t) in
                enumerate([("tcp", "TCP gives reliable connections."), ("udp", "UDP sends datagrams."),
                           ("dns", "DNS maps names to addresses.")])]
        store.upsert(rows)
        records = DocRecord.from_rows(rows)
        records[2] = DocRecord("dns", 1, 10, sample="")  # no sample: the store has the text
        records.append(DocRecord("synthetic-1", 1, 10, synthetic=True, sample="a generated text"))
        now = time.time()
        mem.record_ingest(records, now=now)

        class H:
            def __init__(self, d):
                self.doc_id = d

        mem.record_hits([H("tcp"), H("udp"), H("synthetic-1")], query="which protocol is reliable",
                        cited=["tcp"], now=now + 1)
        mem.record_hits([H("tcp")], query="reliable transport protocol", cited=["tcp"], now=now + 1.5)
        mem.record_hits([H("dns"), H("synthetic-1")], query="what maps names", cited=["dns"], now=now + 2)
        assert store.texts(["dns", "nope"]) == {"dns": "DNS maps names to addresses."}

        replay = gather_replay(mem, 10, store=store, recent=1)
        assert replay.source == "memory"
        assert replay.texts[0] == "TCP gives reliable connections."
        assert set(replay.texts) == {"TCP gives reliable connections.", "UDP sends datagrams.",
                                     "DNS maps names to addresses."}
        assert sorted(replay.pairs) == [("reliable transport protocol", "TCP gives reliable connections."),
                                        ("which protocol is reliable", "TCP gives reliable connections.")]
        assert replay.recent == ["DNS maps names to addresses."]
        assert replay.recent_pairs == [("what maps names", "DNS maps names to addresses.")]
        everything_recent = gather_replay(mem, 10, store=store)
        assert everything_recent.recent[0] == "DNS maps names to addresses." and everything_recent.pairs == []
        assert len(everything_recent.recent) == 3 and len(everything_recent.recent_pairs) == 3

        empty = MemoryManager(MemoryConfig(redis_url=redis_url, prefix=prefix + "-empty"))
        fallback = gather_replay(empty, 5)
        assert fallback.source == "corpus" and len(fallback.texts) == 5 and len(fallback.pairs) == 5
    finally:
        store.close()


@pytest.fixture
def small_cfg(redis_url, prefix, tmp_path) -> LearnerConfig:
    return LearnerConfig(steps=3, batch_size=8, grad_accum=2, lr=1e-4, canary_queries=40, canary_distractors=300,
                         replay_pool=32, data_dir=str(tmp_path), redis_url=redis_url, redis_prefix=prefix,
                         timeout_s=300)


def test_an_update_in_a_subprocess_writes_a_new_loadable_version(small_cfg, redis_url, prefix):
    """~50 buffered examples (25 kept samples and their queries) and a memory replay; a 3-step update runs
    in its own process: the checkpoint exists, loads as the serving runtime, names a new version whose
    parent is the shipped one, has its loss history, and the result is a valid RetentionUpdate whose
    verdict follows the promotion rule."""
    from hybridrag.models import corpora

    pairs = corpora.training_pairs(limit=25, sources=("chatterbot",), seed=3)
    buf = TrainingBuffer.from_config(small_cfg)
    buf.add([GeneratedDocument(query_id=f"q{i}", query=q, doc_id=f"gen-{i}", text=p, kept=True,
                               encoder_version="hybrid-test") for i, (q, p) in enumerate(pairs)])
    examples = buf.snapshot(small_cfg.min_examples)
    assert len(examples) == 50
    replay = Replay(["A compiler translates source code.", "Rain falls from clouds.", "A cat is a small mammal."],
                    [("what does a compiler do", "A compiler translates source code.")], "memory",
                    recent=["TCP gives reliable connections."])

    t0 = time.monotonic()
    result = asyncio.run(run_update_in_subprocess(None, examples, replay, small_cfg))
    seconds = time.monotonic() - t0
    assert result.error == "", result.detail

    _, base_meta = load_checkpoint(DEFAULT_CHECKPOINT)
    runtime = HybridEncoderRuntime.load(result.checkpoint)
    assert result.base_version == base_meta["version"]
    assert result.new_version == runtime.meta["version"] != base_meta["version"]
    assert result.checkpoint.startswith(small_cfg.data_dir) and result.checkpoint.endswith(f"{result.new_version}.pt")
    assert runtime.meta["step"] == base_meta["step"] + 3
    assert runtime.meta["metrics"]["learner"]["parent"] == base_meta["version"]
    assert runtime.meta["metrics"]["learner"]["replay_source"] == "memory"
    vecs = runtime.encode(["what is a compiler", "hello"])
    assert vecs.shape == (2, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    with open(result.checkpoint.replace(".pt", ".loss.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]

    m = result.metrics
    assert m["examples"] == 50 and m["pairs"] == 25 and m["steps"] == 3 and m["replayed"] == 4
    assert m["recent_documents"] == 1
    assert result.promoted == should_promote(m["canary_new"], m["canary_base"], small_cfg.canary_tolerance)
    assert m["canary_delta_lo"] - 1e-9 <= m["canary_delta"] <= m["canary_delta_hi"] + 1e-9  # the paired interval brackets it
    assert "paired 95% interval" in result.detail
    msg = result.to_retention_update()
    assert decode(RetentionUpdate, encode(msg), max_bytes=1 << 20) == msg
    assert msg.kind == ("encoder-promoted" if result.promoted else "encoder-rejected")
    assert msg.encoder_version == result.new_version and msg.checkpoint == result.checkpoint
    assert buf.drop([e.doc_id for e in examples]) == 50 and buf.size() == 0
    assert seconds < 90


def test_a_failing_update_returns_its_error(small_cfg):
    """A base checkpoint that does not exist: the subprocess fails and the worker gets the reason, not an exception."""
    result = asyncio.run(run_update_in_subprocess("/nonexistent/base.pt", [Example("g", "q", "a query", "a text")],
                                                  Replay(), small_cfg))
    assert not result.promoted and result.checkpoint == ""
    assert "No such file" in result.error or "FileNotFoundError" in result.error
    assert result.to_retention_update().kind == "encoder-rejected"


def test_an_update_past_its_timeout_is_killed(small_cfg):
    """A one-second budget: the update process is killed and the result says so, well before a hang."""
    t0 = time.monotonic()
    result = asyncio.run(run_update_in_subprocess(None, [Example("g", "q", "a query", "a text")], Replay(),
                                                  small_cfg, timeout_s=1.0))
    assert "timed out after 1s" in result.error and not result.promoted
    assert time.monotonic() - t0 < 10
