"""The memory manager's pure rules: decay, importance, its sort key, patterns, replay by offset."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrag.agents.retention.memory_manager import (
    DocRecord,
    MemoryConfig,
    RecordPosition,
    UsageState,
    apply_event,
    count_offset,
    decay_factor,
    importance,
    importance_at,
    importance_key,
    lfu_score,
    query_signature,
)
from hybridrag.agents.rag.store import Row

H = 100.0


def test_decay_halves_every_half_life_and_never_grows():
    assert decay_factor(0, H) == 1.0
    assert decay_factor(H, H) == 0.5
    assert decay_factor(3 * H, H) == 0.125
    assert decay_factor(-50, H) == 1.0  # a clock that went backwards


def test_apply_event_decays_then_adds():
    s = apply_event(UsageState(a=4, h=2, r=1, t_ref=0), H, H, accesses=1, hits=1)
    assert (s.a, s.h, s.r, s.t_ref) == (3.0, 2.0, 0.5, H)
    s = apply_event(s, 2 * H, H, touch=True)
    assert (s.a, s.h, s.r) == (1.5, 1.0, 1.0)


def test_importance_weights_and_quality():
    s = UsageState(a=2, h=1, r=0.5)
    assert importance(s, 1.0, 1.0, 2.0, 1.0) == 4.5
    assert importance(s, 0.2, 1.0, 2.0, 1.0) == pytest.approx(0.9)


def test_importance_key_roundtrip():
    key = importance_key(6.0, 1000.0, H)
    assert importance_at(key, 1000.0, H) == pytest.approx(6.0)
    assert importance_at(key, 1000.0 + 2 * H, H) == pytest.approx(1.5)
    assert math.isfinite(importance_key(0.0, 0.0, H))


events = st.lists(
    st.tuples(st.floats(0, 500), st.integers(0, 3), st.integers(0, 2), st.booleans()), min_size=1, max_size=8
)


@settings(max_examples=200, deadline=None)
@given(events, events, st.floats(0, 2000))
def test_key_order_is_the_order_of_importance_at_any_later_time(ev1, ev2, later):
    """The sorted-set key ranks two documents as their decayed importances do, at every later time."""

    def run(evs):
        s, t = UsageState(), 0.0
        for dt, acc, hits, touch in evs:
            t += dt
            s = apply_event(s, t, H, accesses=acc, hits=hits, touch=touch)
        return s

    s1, s2 = run(ev1), run(ev2)
    k1 = importance_key(importance(s1, 1, 1, 2, 1), s1.t_ref, H)
    k2 = importance_key(importance(s2, 1, 1, 2, 1), s2.t_ref, H)
    now = max(s1.t_ref, s2.t_ref) + later
    i1 = importance(apply_event(s1, now, H), 1, 1, 2, 1)
    i2 = importance(apply_event(s2, now, H), 1, 1, 2, 1)
    if abs(i1 - i2) > 1e-9 * max(i1, i2, 1e-300) and min(i1, i2) > 1e-250:
        assert (k1 < k2) == (i1 < i2)
    assert importance_at(k1, now, H) == pytest.approx(i1, rel=1e-9, abs=1e-250)


def test_lfu_score_counts_first_then_older_first():
    assert lfu_score(1, 1.7e9) > lfu_score(0, 1.8e9)
    assert lfu_score(3, 1.6e9) < lfu_score(3, 1.7e9)


@pytest.mark.parametrize(
    "a, b",
    [
        ("What is virtual memory?", "virtual memories"),
        ("How does a hash table find an item quickly?", "hash tables: how do they find items quickly"),
        ("Which queries match?", "query matches"),
        ("What are the classes?", "class"),
    ],
)
def test_rephrasings_share_a_pattern(a, b):
    assert query_signature(a) == query_signature(b) != ""


def test_patterns_differ_by_content_and_stop_words_alone_have_none():
    assert query_signature("virtual memory") != query_signature("cache memory")
    assert query_signature("What is it?") == ""


def test_doc_records_from_store_rows():
    rows = [
        Row("d#1", "d", 1, "wörld", None, title="T", tenant="acme"),
        Row("d#0", "d", 0, "hello", None, title="T", tenant="acme"),
        Row("e#0", "e", 0, "x", None, synthetic=True),
    ]
    d, e = DocRecord.from_rows(rows, quality={"e": 0.3})
    assert (d.doc_id, d.chunks, d.bytes, d.tenant, d.title, d.sample, d.quality) == ("d", 2, 11, "acme", "T", "hello", None)
    assert d.chunk_ids() == ["d#0", "d#1"]
    assert (e.synthetic, e.quality) == (True, 0.3)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="mru is not a valid eviction policy"):
        MemoryConfig(policy="mru")


def test_an_offset_counts_once_above_its_partitions_mark():
    assert count_offset(None, 0) == (True, 0)
    assert count_offset(7, 8) == (True, 8)
    assert count_offset(7, 7) == (False, 7)
    assert count_offset(7, 3) == (False, 7)
    assert count_offset(7, 12) == (True, 12)  # a gap (a dead-lettered record) is no reason to stop
    assert RecordPosition("grp", "t-queries", 3, 41).mark == "grp/t-queries/3"


def _replay(order) -> list[int]:
    mark, counted = None, []
    for offset in order:
        ok, mark = count_offset(mark, offset)
        if ok:
            counted.append(offset)
    return counted


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 50), st.randoms(use_true_random=False))
def test_two_owners_of_a_partition_count_every_offset_exactly_once(committed, queued, extra, rnd):
    """The old owner counted and acked ``[0, committed)`` and still answers ``queued`` more it
    had taken; the new owner starts at the committed offset and goes ``extra`` past them. However
    the two interleave (each in offset order), every offset is counted exactly once."""
    old = list(range(committed, committed + queued))
    new = list(range(committed, committed + queued + extra))
    order = list(range(committed))
    while old or new:
        side = old if (old and (not new or rnd.random() < 0.5)) else new
        order.append(side.pop(0))
    assert _replay(order) == list(range(committed + queued + extra))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 100), max_size=30), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_no_offset_is_ever_counted_twice(workers, rnd):
    """Any number of writers, each in offset order, interleaved anyhow: an offset never counts twice."""
    queues = [sorted(w) for w in workers]
    order = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        order.append(q.pop(0))
    counted = _replay(order)
    assert len(counted) == len(set(counted))
