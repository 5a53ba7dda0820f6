"""The in-process mirror of a Milvus Lite collection: exact search, and a size bounded under churn."""

from __future__ import annotations

import numpy as np

from hybridrag.agents.rag.store import ExactMirror


def put(m: ExactMirror, i: int, doc: str, vec) -> None:
    m.put(f"{doc}#{i}", np.asarray(vec, np.float32), doc, i, f"text {doc} {i}", "", "", False)


def test_churn_keeps_the_mirror_within_twice_its_live_rows():
    """100 documents live; 10,000 times one is deleted and written again (an eviction, a re-ingest).
    Dead slots are compacted away, so the mirror stays under 2 x live + COMPACT_MIN slots, and the
    search still finds every live row, exactly."""
    rng = np.random.default_rng(0)
    m = ExactMirror(8)
    vecs = {d: rng.normal(size=8).astype(np.float32) for d in range(100)}
    for d, v in vecs.items():
        put(m, 0, f"d{d}", v / np.linalg.norm(v))
    most = 0
    for step in range(10_000):
        d = int(rng.integers(100))
        m.remove(f"d{d}#0")
        v = rng.normal(size=8).astype(np.float32)
        vecs[d] = v / np.linalg.norm(v)
        put(m, 0, f"d{d}", vecs[d])
        most = max(most, m.size)
    assert m.count() == 100
    assert most <= 2 * 100 + ExactMirror.COMPACT_MIN + 1
    assert len(m.rows_of_doc) == 100 and len(m.meta) == m.size
    for d in (0, 42, 99):
        (top,) = m.search(vecs[d][None], 1, "", True)
        assert top[0].doc_id == f"d{d}" and abs(top[0].score - 1.0) < 1e-5


def test_compaction_keeps_rows_their_data_and_order():
    m = ExactMirror(2)
    for i in range(6):
        put(m, i, "a", [1.0, float(i)])
    for i in (0, 2, 4):
        m.remove(f"a#{i}")
    m.compact()
    assert m.size == 3 and m.dead() == 0
    assert [m.meta[r][0] for r in range(3)] == ["a#1", "a#3", "a#5"]
    assert m.vectors[m.row_of["a#3"]].tolist() == [1.0, 3.0]
    assert sorted(m.stale_ids("a", 4)) == ["a#5"]
    assert m.rows_of_doc == {"a": {0, 1, 2}}
