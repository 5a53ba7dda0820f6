"""The vector store on a real Milvus Lite file: the in-process mirror answers exactly as Milvus does."""

import numpy as np
import pytest

from hybridrag.agents.rag.store import Row, VectorStore, mean_top_similarity

pytestmark = pytest.mark.integration


def unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    s = VectorStore(str(tmp_path / "s.db"), "c", "v1", 16)
    x = unit(rng, 300)
    s.upsert([Row(f"d{i}#0", f"d{i}", 0, f"text {i}", x[i], tenant="a" if i % 3 else "b", synthetic=i % 5 == 0)
              for i in range(300)])
    yield s, x, rng
    s.close()


def test_mirror_search_equals_milvus_flat_search(store):
    s, x, rng = store
    q = unit(rng, 8)
    ours = s.search(q, 10, tenant="a", include_synthetic=False)
    raw = s.client.search(s.name, data=q.tolist(), limit=10, filter='tenant == "a" and synthetic == false',
                          output_fields=["doc_id"])
    for mine, theirs in zip(ours, raw):
        assert [h.id for h in mine] == [h["id"] for h in theirs]
        assert np.allclose([h.score for h in mine], [h["distance"] for h in theirs], atol=1e-5)
        assert all(h.tenant == "a" and not h.synthetic for h in mine)


def test_tenants_never_see_each_other(store):
    s, x, rng = store
    hits = s.search(x[:20], 50, tenant="b")
    assert all(h.tenant == "b" for hs in hits for h in hs)
    assert s.search(x[:2], 5, tenant="nobody") == [[], []]


def test_reopen_loads_the_mirror_and_deletes_reach_both(store, tmp_path):
    s, x, rng = store
    s.delete(["d1#0", "d2#0"])
    s.delete_stale_chunks({"d4": 0})  # a re-ingested d4 with no chunks left
    assert s.count() == 297
    s.close()
    again = VectorStore(str(tmp_path / "s.db"), "c", "v1", 16)
    assert again.count() == 297
    hit_ids = {h.id for hs in again.search(x[:10], 300, tenant="a") for h in hs}
    assert not {"d1#0", "d2#0", "d4#0"} & hit_ids
    assert again.search(x[7:8], 1, tenant="a")[0][0].id == "d7#0"


def exact_hubness(x, tenant_of, synthetic_of, i, k=20):
    """Row i's mean cosine to its k nearest real rows of its tenant, itself left out."""
    pool = [j for j in range(len(x)) if tenant_of(j) == tenant_of(i) and not synthetic_of(j) and j != i]
    return float(mean_top_similarity(x[i : i + 1], x[pool], k)[0])


def test_hubness_is_exact_after_the_refresh_and_survives_a_reopen(store, tmp_path):
    """300 rows in one write pass the refresh threshold: every row's hubness is then its mean
    cosine to its 20 nearest real rows of the same tenant, in the mirror, in Milvus, and in the
    hits; a reopened store reads the same values back from the file."""
    s, x, rng = store
    tenant_of, synthetic_of = (lambda j: "a" if j % 3 else "b"), (lambda j: j % 5 == 0)
    assert s.hubness_rows == 300
    expected = {f"d{i}#0": exact_hubness(x, tenant_of, synthetic_of, i) for i in range(0, 300, 7)}
    stored = {r["id"]: r["hubness"] for r in s.client.get(s.name, ids=list(expected), output_fields=["hubness"])}
    assert stored == pytest.approx(expected, abs=1e-5)
    hits = s.search(x[7:8], 1, tenant="a")[0]
    assert hits[0].hubness == pytest.approx(exact_hubness(x, tenant_of, synthetic_of, 7), abs=1e-5)
    assert hits[0].vector is None and np.allclose(s.search(x[7:8], 1, tenant="a", with_vectors=True)[0][0].vector, x[7])
    s.close()
    again = VectorStore(str(tmp_path / "s.db"), "c", "v1", 16)
    assert again.hubness_rows == 300
    assert again.search(x[7:8], 1, tenant="a")[0][0].hubness == pytest.approx(hits[0].hubness, abs=1e-6)


def test_an_upsert_estimates_hubness_from_the_stored_rows_and_its_own_batch(tmp_path):
    """Between refreshes a new row's hubness counts the rows already stored and the other rows of its
    batch, never an older copy of itself; growing past the factor refreshes the whole collection."""
    rng = np.random.default_rng(1)
    s = VectorStore(str(tmp_path / "e.db"), "e", "v1", 16, hubness_k=5, hubness_refresh_growth=2.0)
    x = unit(rng, 200)
    s.upsert([Row(f"d{i}#0", f"d{i}", 0, "t", x[i]) for i in range(100)])
    assert s.hubness_rows == 100
    s.upsert([Row(f"d{i}#0", f"d{i}", 0, "t", x[i]) for i in (3, 100, 101)])  # a replay and two new rows
    rows = {i: s.mirror.hubness[s.mirror.row_of[f"d{i}#0"]] for i in (3, 100, 101)}
    for i in (3, 100, 101):
        others = [j for j in range(102) if j != i]
        assert rows[i] == pytest.approx(float(mean_top_similarity(x[i : i + 1], x[others], 5)[0]), abs=1e-5)
    assert s.hubness_rows == 100  # 102 rows: no refresh yet
    s.upsert([Row(f"d{i}#0", f"d{i}", 0, "t", x[i]) for i in range(102, 200)])
    assert s.hubness_rows == 200
    s.close()


def test_old_collections_go_once_no_alias_names_them(tmp_path):
    """Four encoder versions were built in turn; v2 serves. Keeping two leaves v3 and v4 (the newest)
    and v2 (the alias names it); v1 is dropped. Once the alias moves to v4, v2 goes too. Another
    deployment's collection in the same file is never touched."""
    uri = str(tmp_path / "c.db")
    stores = {v: VectorStore(uri, "chunks", v, 8) for v in ("v1", "v2", "v3", "v4")}
    other = VectorStore(uri, "elsewhere", "v1", 8)
    stores["v2"].point_alias()
    names = {v: s.name for v, s in stores.items()}
    assert stores["v2"].collections() == [names[v] for v in ("v1", "v2", "v3", "v4")]
    assert stores["v4"].drop_old_collections(keep=2) == [names["v1"]]
    assert stores["v4"].collections() == [names["v2"], names["v3"], names["v4"]]
    stores["v4"].point_alias()
    assert stores["v4"].drop_old_collections(keep=2) == [names["v2"]]
    assert stores["v4"].drop_old_collections(keep=2) == []
    assert set(stores["v4"].client.list_collections()) == {names["v3"], names["v4"], other.name}
    for s in [*stores.values(), other]:
        s.close()


def _demo_rows(rng, tenant_of=lambda i: "", synthetic_of=lambda i: False):
    import json

    from hybridrag.agents.evaluation.datasets import DEMO_DIR

    docs = [json.loads(line) for line in (DEMO_DIR / "corpus.jsonl").read_text().splitlines() if line.strip()]
    x = unit(rng, len(docs))
    return docs, [Row(f"{d['_id']}#0", d["_id"], 0, d["text"], x[i], title=d["title"], tenant=tenant_of(i),
                      synthetic=synthetic_of(i)) for i, d in enumerate(docs)]


LEXICAL_QUERIES = ["What does a compiler do?", "reliable full-duplex transport protocol", "cache memory",
                   "deadlock between processes", "hash table hash", "virtual memory paging disk", "recursion",
                   "firewall network security", "the of and", "Unix kernel process scheduling time-sharing"]


def test_mirror_bm25_ranks_as_milvus_bm25(tmp_path):
    """The in-process lexical index returns Milvus's BM25 ranking and scores under tenant and synthetic filters;
    after deletes and an upsert that changes a row's text, both drop the old rows and find the new text.

    No hubness here: its refresh rewrites rows, and Milvus counts a rewritten row's old version in its BM25
    statistics until it compacts (the mirror counts live rows only), which moves scores by a few percent.
    """
    rng = np.random.default_rng(1)
    s = VectorStore(str(tmp_path / "lex.db"), "c", "v1", 16, hubness_k=0)
    docs, rows = _demo_rows(rng, tenant_of=lambda i: "a" if i % 4 else "b", synthetic_of=lambda i: i % 7 == 0)
    s.upsert(rows)
    try:
        for tenant, synth in (("a", False), ("a", True), ("b", True)):
            mine = s.lexical_search(LEXICAL_QUERIES, 10, tenant=tenant, include_synthetic=synth)
            theirs = s.server_lexical_search(LEXICAL_QUERIES, 10, tenant=tenant, include_synthetic=synth)
            assert sum(len(h) for h in mine) > 20
            for q, m, t in zip(LEXICAL_QUERIES, mine, theirs):
                assert np.allclose([h.score for h in m], [h.score for h in t], rtol=1e-5), q
                # the same order, up to the order of tied scores (Milvus breaks ties its own way)
                score_of = {h.id: h.score for h in t}
                for h in m:
                    assert np.isclose(score_of.get(h.id, t[-1].score), h.score, rtol=1e-5), (q, h.id)
                assert all(h.tenant == tenant and (synth or not h.synthetic) for h in m)
        assert s.lexical_search(["the of and"], 5, tenant="a") == [[]]  # stop words only: nothing matches
        gone = [r.id for r in rows if r.tenant == "a"][:2]
        s.delete(gone)
        new = rows[5]
        s.upsert([Row(new.id, new.doc_id, 0, "Zorblax frobnicates the quux", new.vector, tenant=new.tenant)])
        for hits in (s.lexical_search(["zorblax", "compiler deadlock cache"], 300, tenant="a"),
                     s.server_lexical_search(["zorblax", "compiler deadlock cache"], 300, tenant="a")):
            assert [h.id for h in hits[0]] == [new.id]
            assert not set(gone) & {h.id for h in hits[1]}
    finally:
        s.close()
