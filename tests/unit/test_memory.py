"""The memory manager's pure scoring: decay, importance, its sort key, patterns."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrag.agents.retention.memory_manager import (
    DocRecord,
    MemoryConfig,
    UsageState,
    apply_event,
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
