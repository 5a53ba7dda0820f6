"""The memory manager on the real Redis and the real Milvus Lite.

Each test gets its own uuid key prefix (removed afterwards) and its own Milvus
collection. Clocks are passed explicitly, so the orders are exact.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from hybridrag.agents.kafka.broker import free_port
from hybridrag.agents.retention.memory_manager import (
    DocRecord,
    MemoryConfig,
    MemoryManager,
    MemoryUnavailable,
    RecordPosition,
    UsageState,
    apply_event,
    count_offset,
    importance,
    importance_at,
    lfu_score,
)
from hybridrag.agents.rag.store import Hit, Row, VectorStore

pytestmark = pytest.mark.integration
DIM = 16


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "memory.db")


@pytest.fixture
def store(milvus_uri):
    s = VectorStore(milvus_uri, f"mem_{uuid.uuid4().hex[:8]}", "test", DIM)
    yield s
    s.close()


@pytest.fixture
def make_memory(redis_url):
    """Managers on a fresh key prefix; every key under it is deleted afterwards."""
    made = []
    prefix = f"test-mem-{uuid.uuid4().hex[:10]}"

    def factory(**kw) -> MemoryManager:
        kw.setdefault("redis_url", redis_url)
        kw.setdefault("prefix", prefix)
        m = MemoryManager(MemoryConfig(**kw))
        made.append(m)
        return m

    yield factory
    if made:
        made[0].clear()
        assert not made[0].client.keys(made[0].ns + "*")
    for m in made:
        m.close()


def index(store: VectorStore, memory: MemoryManager, docs: dict[str, int], t0: float = 1000.0, **kw) -> None:
    """Index documents (doc id -> chunks) one second apart, in the store and the memory."""
    rng = np.random.default_rng(0)
    for i, (doc_id, chunks) in enumerate(docs.items()):
        rows = []
        for c in range(chunks):
            v = rng.normal(size=DIM).astype(np.float32)
            rows.append(Row(f"{doc_id}#{c}", doc_id, c, f"text of {doc_id} chunk {c} " + "x" * 40, v / np.linalg.norm(v)))
        store.upsert(rows)
        memory.record_ingest(DocRecord.from_rows(rows, quality=kw.get("quality")), now=t0 + i)


def hit(doc_id: str, chunk: int = 0) -> Hit:
    return Hit(f"{doc_id}#{chunk}", doc_id, chunk, "", 0.5)


def stored_docs(store: VectorStore) -> set[str]:
    res = store.client.query(store.name, filter="chunk >= 0", output_fields=["doc_id"], consistency_level="Strong")
    return {r["doc_id"] for r in res}


def test_lru_evicts_least_recently_touched(store, make_memory):
    """Five documents indexed a second apart; a and c are then retrieved. With room
    for three, LRU evicts b then d: the untouched ones, oldest first."""
    m = make_memory(policy="lru", capacity_docs=3)
    index(store, m, {"a": 2, "b": 1, "c": 1, "d": 3, "e": 1})
    m.record_hits([hit("a")], now=1010)
    m.record_hits([hit("c")], now=1011)
    assert m.eviction_order() == ["b", "d", "e", "a", "c"]
    assert m.evict(store) == ["b", "d"]
    assert stored_docs(store) == {"a", "c", "e"}
    assert store.count() == 2 + 1 + 1
    s = m.stats()
    assert (s["documents"], s["evictions"]["lru"], s["pending_evictions"]) == (3, 2, 0)
    assert m.evict(store) == []  # within capacity: nothing more goes


def test_lfu_evicts_least_frequently_used_oldest_first(store, make_memory):
    """Accesses a:3, b:1, c:0, d:2, e:0 (e newer than c). With room for two, LFU evicts
    c (0, older), e (0), then b (1)."""
    m = make_memory(policy="lfu", capacity_docs=2)
    index(store, m, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1})
    for i, docs in enumerate([["a", "b", "d"], ["a", "d"], ["a"]]):
        m.record_hits([hit(d) for d in docs], now=1100 + i)
    assert m.evict(store) == ["c", "e", "b"]
    assert stored_docs(store) == {"a", "d"}
    assert m.stats()["evictions"] == {"lru": 0, "lfu": 3, "importance": 0}


def test_importance_weighs_citations_decay_and_quality(store, make_memory):
    """Importance with a one-hour half-life, ten hours after indexing:
    - old: cited 4 times at indexing, then nothing: 13 decayed by 2^-10, about 0.013;
    - synth_bad / synth_good: synthetic, indexed just now, generation quality 0.1 / 0.9;
    - fresh: retrieved once (not cited) just now: 1 + recency 1;
    - cited: cited once just now: 1 + 2 + 1.
    Eviction goes in that order."""
    H = 3600.0
    m = make_memory(policy="importance", capacity_docs=2, half_life_s=H)
    index(store, m, {"old": 1, "fresh": 1, "cited": 1})
    index(store, m, {"synth_good": 1, "synth_bad": 1}, t0=1000 + 10 * H, quality={"synth_good": 0.9, "synth_bad": 0.1})
    for i in range(4):
        m.record_hits([hit("old")], now=1000)
    now = 1000 + 10 * H + 5
    m.record_hits([hit("fresh")], cited=[], now=now)
    m.record_hits([hit("cited")], now=now)
    order = m.eviction_order()
    assert order == ["old", "synth_bad", "synth_good", "fresh", "cited"]
    # the stored order is the order of the importances the pure functions give
    imps = {d: m.importance_of(d, now=now) for d in order}
    assert sorted(imps, key=imps.get) == order
    assert m.evict(store) == ["old", "synth_bad", "synth_good"]
    assert stored_docs(store) == {"fresh", "cited"}
    assert [d.doc_id for d in m.top_important(5, now=now)] == ["cited", "fresh"]


def test_byte_capacity(store, make_memory):
    """A byte capacity evicts, in policy order, until the kept chunk text fits."""
    m = make_memory(policy="lru", capacity_bytes=200)
    index(store, m, {"a": 3, "b": 3, "c": 1})
    size = len(b"text of a chunk 0 " + b"x" * 40)  # every chunk here has this size
    assert m.stats()["bytes"] == 7 * size
    assert m.evict(store) == ["a", "b"]  # 7 -> 4 chunks is still over 200 bytes; 1 chunk fits
    s = m.stats()
    assert (s["bytes"], s["evicted_bytes"], s["documents"]) == (size, 6 * size, 1)
    assert stored_docs(store) == {"c"}


def test_redis_state_matches_the_scoring_functions(make_memory):
    """The Lua updates compute exactly what the pure Python functions compute."""
    H = 600.0
    m = make_memory(half_life_s=H, weight_access=1.0, weight_hit=2.0, weight_recency=0.5)
    m.record_ingest([DocRecord("s", 1, 10, synthetic=True, quality=0.7)], now=100)
    m.record_hits([hit("s")], now=400)
    m.record_hits([hit("s")], cited=[], now=1000)
    m.record_synthetic_quality("s", 0.4, now=1300)
    s = UsageState(t_ref=100)
    s = apply_event(s, 100, H, touch=True)
    s = apply_event(s, 400, H, accesses=1, hits=1, touch=True)
    s = apply_event(s, 1000, H, accesses=1, touch=True)
    s = apply_event(s, 1300, H)
    expected = importance(s, 0.4, 1.0, 2.0, 0.5)
    assert m.importance_of("s", now=1300) == pytest.approx(expected, rel=1e-12)
    assert m.importance_of("s", now=1300 + H) == pytest.approx(expected / 2, rel=1e-12)
    raw = m.client.zscore(m.ns + "z:lfu", "s")
    assert raw == pytest.approx(lfu_score(2, 1000))
    (top,) = m.top_important(1, now=1300)
    assert (top.accesses, top.hits, top.quality, top.synthetic) == (2, 1, 0.4, True)
    assert importance_at(m.client.zscore(m.ns + "z:imp", "s"), 1300, H) == pytest.approx(expected)


def at(partition: int, offset: int, group: str = "g") -> RecordPosition:
    return RecordPosition(group, "queries", partition, offset)


def test_replayed_hits_count_once(make_memory):
    """Hits come with their record's Kafka position. The same record applied again,
    sequentially or from eight threads at once, counts once, and so does an older
    offset of the same partition; the bookkeeping is one mark per partition."""
    m = make_memory()
    m.record_ingest([DocRecord("a", 1, 10), DocRecord("b", 1, 10)], now=0)
    assert m.record_hits([hit("a"), hit("a", 1), hit("b")], position=at(0, 10), query="What is a cache?",
                         cited=["a#1"], now=5)
    assert not m.record_hits([hit("a"), hit("b")], position=at(0, 10), query="What is a cache?", now=6)
    assert not m.record_hits([hit("a")], position=at(0, 4), query="What is a cache?", now=6)
    results = []
    threads = [threading.Thread(target=lambda: results.append(m.record_hits([hit("b")], position=at(1, 0), now=7)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    m.record_hits([], position=at(0, 11), query="nothing matches", now=8)
    docs = {d.doc_id: d for d in m.top_important(2, now=8)}
    assert (docs["a"].accesses, docs["a"].hits) == (1, 1)  # two chunks of a: one access
    assert (docs["b"].accesses, docs["b"].hits) == (2, 1)  # q1 (not cited) and q2 (cited: default)
    s = m.stats()
    assert (s["queries"], s["queries_with_hits"], s["accesses"], s["cited"]) == (3, 2, 3, 2)
    assert s["hit_rate"] == pytest.approx(2 / 3)
    pats = {p.signature: p for p in m.top_patterns(5, now=8)}
    assert set(pats) == {"cache", "match nothing"}
    assert (pats["cache"].count, pats["cache"].doc_ids, pats["cache"].query) == (1, ["a"], "What is a cache?")
    assert pats["match nothing"].doc_ids == []
    assert m.offset_marks() == {"g/queries/0": 11, "g/queries/1": 0}
    # another consumer group has a mark of its own
    assert m.record_hits([hit("a")], position=at(0, 10, group="other"), now=9)


def test_two_owners_of_a_partition_count_each_offset_once(make_memory):
    """A rebalance moves a partition while its old owner still answers the queries it had
    queued: it counted and acked offsets 0-119 (so the group committed 120), the new owner
    starts at 120 and goes on to 199, and the old one still answers 120-159. Interleaved at
    random, every offset's hits count exactly once, Redis decides as count_offset does, and
    the bookkeeping stays one key however many queries go through."""
    m = make_memory()
    m.record_ingest([DocRecord("a", 1, 10)], now=0)
    rng = random.Random(5)
    old, new = list(range(120, 160)), list(range(120, 200))
    order = [("old", o) for o in range(120)]
    while old or new:
        side = old if (old and (not new or rng.random() < 0.5)) else new
        order.append(("old" if side is old else "new", side.pop(0)))
    mark, counted = None, []
    for _, offset in order:
        expected, mark = count_offset(mark, offset)
        assert m.record_hits([hit("a")], position=at(2, offset), now=1) == expected
        if expected:
            counted.append(offset)
    assert counted == list(range(200))
    assert m.stats()["queries"] == 200
    assert sorted(k.decode() for k in m.client.keys(m.ns + "*")) == sorted(
        m.ns + k for k in ("doc:a", "z:lru", "z:lfu", "z:imp", "totals", "offsets"))


def test_a_batch_in_one_round_trip_counts_as_its_queries_one_by_one(make_memory):
    """record_hits_many over a batch (a replayed record in it) leaves the same counts as record_hits per query."""
    one, many = make_memory(prefix=f"test-mem-{uuid.uuid4().hex[:8]}"), make_memory(prefix=f"test-mem-{uuid.uuid4().hex[:8]}")
    batch = [([hit("a"), hit("b")], at(0, 1), "what is a cache"), ([hit("b")], at(1, 1), "tcp"),
             ([hit("a")], at(0, 1), "what is a cache"), ([], at(0, 2), "nothing")]
    for m in (one, many):
        m.record_ingest([DocRecord("a", 1, 10), DocRecord("b", 1, 10)], now=0)
    singles = [one.record_hits(h, position=p, query=q, now=5) for h, p, q in batch]
    assert many.record_hits_many(batch, now=5) == singles == [True, True, False, True]
    for key in ("queries", "queries_with_hits", "accesses", "cited", "patterns"):
        assert one.stats()[key] == many.stats()[key]
    assert one.offset_marks() == many.offset_marks()
    for m in (one, many):
        m.clear()


def test_patterns_stay_within_their_bound(make_memory):
    """More distinct query patterns than ``max_patterns``: the least important go, with their keys."""
    m = make_memory(max_patterns=3)
    m.record_ingest([DocRecord("a", 1, 10)], now=0)
    for i, word in enumerate(["alpha", "beta", "gamma", "delta", "epsilon"]):
        for _ in range(5 - i):  # alpha asked most, epsilon least, all at the same time
            m.record_hits([hit("a")], query=f"what is {word}", now=10)
    assert m.stats()["patterns"] == 3
    assert {p.signature for p in m.top_patterns(10, now=10)} == {"alpha", "beta", "gamma"}
    assert not m.client.exists(m.ns + "pat:epsilon", m.ns + "pat:epsilon:docs")


class CrashingStore:
    """The real store, with a process crash injected around its delete."""

    def __init__(self, store: VectorStore, crash_after_delete: bool):
        self.store = store
        self.crash_after_delete = crash_after_delete

    def delete(self, ids):
        if self.crash_after_delete:
            self.store.delete(ids)
        raise KeyboardInterrupt("worker killed")  # not an Exception: nothing on the way may swallow it


@pytest.mark.parametrize("crash_after_delete", [False, True], ids=["before-store-delete", "after-store-delete"])
def test_restart_mid_eviction_loses_nothing_and_leaves_nothing(store, make_memory, crash_after_delete):
    """A worker dies in the middle of an eviction: before the vectors are deleted, or
    after they are but before the Redis records go. A new worker's ``recover``
    finishes the job: the victims are gone from both the store and Redis, the
    survivors are intact in both, and the counters are exact. Recovering twice
    changes nothing."""
    m = make_memory(policy="lru", capacity_docs=2)
    index(store, m, {"a": 2, "b": 1, "c": 1, "d": 1})
    with pytest.raises(KeyboardInterrupt):
        m.evict(CrashingStore(store, crash_after_delete))
    assert set(m.pending_evictions()) == {"a", "b"}
    assert m.stats()["documents"] == 4  # records stay until the vectors are gone
    expected_store = {"c", "d"} if crash_after_delete else {"a", "b", "c", "d"}
    assert stored_docs(store) == expected_store

    restarted = make_memory(policy="lru", capacity_docs=2)
    assert restarted.recover(store) == 2
    assert stored_docs(store) == {"c", "d"}
    assert store.count() == 2
    s = restarted.stats()
    assert (s["documents"], s["pending_evictions"], s["evictions"]["lru"]) == (2, 0, 2)
    assert s["bytes"] == sum(len(f"text of {d} chunk 0 ".encode() + b"x" * 40) for d in "cd")
    assert restarted.eviction_order() == ["c", "d"]
    assert not restarted.client.exists(restarted.ns + "doc:a", restarted.ns + "doc:b")
    assert restarted.recover(store) == 0
    assert restarted.stats() == s
    # the evict lock died with the worker's finally block or expires; a new eviction works
    restarted.record_ingest([DocRecord("e", 1, 5)], now=2000)
    store.upsert([Row("e#0", "e", 0, "e", np.ones(DIM, dtype=np.float32) / np.sqrt(DIM))])
    assert restarted.evict(store) == ["c"]


@pytest.fixture
def spare_redis(tmp_path):
    """A private redis-server with a password, which a test may stop and restart."""
    port, password = free_port(), uuid.uuid4().hex

    def start():
        p = subprocess.Popen(
            ["redis-server", "--port", str(port), "--requirepass", password, "--save", "", "--appendonly", "yes",
             "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, password=password)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        return p

    procs = [start()]
    yield port, password, procs, start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


def test_auth_url_and_an_outage_buffer_then_replay(spare_redis):
    """AUTH comes through the URL. While Redis is down every call raises
    MemoryUnavailable (the query path catches it), and updates are buffered;
    after Redis is back, the next call replays them first, once each."""
    port, password, procs, start = spare_redis
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    for wrong in (f"redis://:not-{password}@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
        with pytest.raises(MemoryUnavailable, match="authentication") as err:
            MemoryManager(MemoryConfig(redis_url=wrong, prefix="p")).record_hits([], now=0)
        assert not err.value.buffered
    m = MemoryManager(MemoryConfig(redis_url=url, prefix="p", socket_timeout_s=0.5))
    m.record_ingest([DocRecord("a", 1, 10)], now=0)
    procs[0].terminate()
    procs[0].wait(10)
    with pytest.raises(MemoryUnavailable) as err:
        m.record_hits([hit("a")], now=1)
    assert err.value.buffered
    with pytest.raises(MemoryUnavailable):
        m.record_hits([hit("a")], now=2)
    with pytest.raises(MemoryUnavailable) as err:
        m.stats()
    assert not err.value.buffered
    assert m.pending == 2
    procs.append(start())  # appendonly: the restarted server has the record of "a"
    s = m.stats()
    assert m.pending == 0
    assert (s["documents"], s["queries"], s["accesses"]) == (1, 2, 2)
    m.flush_pending()
    assert m.stats()["queries"] == 2
