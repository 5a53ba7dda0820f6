"""The adaptive retriever's pure maths (BM25, blends, thresholds) and its stages over a small in-memory store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridrag.agents.retention.adaptive_retriever import (
    AdaptiveConfig,
    AdaptiveRetriever,
    NumpyIndex,
    QueryBank,
    RankedHit,
    blend,
    bm25_scores,
    cut,
    gap_cut,
    hubness_corrected,
    is_confident,
    light_stem,
    margin_cut,
    tokenize,
    zscore,
    zscore_cut,
)
from hybridrag.agents.rag.store import Hit, mean_top_similarity


def test_tokenize_drops_stop_words_and_plurals():
    assert tokenize("What are the Hash Tables and their classes?") == ["hash", "table", "class"]
    assert [light_stem(w) for w in ("memories", "boxes", "status", "analysis", "glass")] == [
        "memory", "box", "status", "analysis", "glass"]


def test_bm25_matches_the_formula_by_hand():
    docs = [["cache", "memory"], ["disk"], ["cache", "cache", "line", "size"]]
    got = bm25_scores(["cache"], docs, k1=1.5, b=0.75)
    n, df, avgdl = 3, 2, (2 + 1 + 4) / 3
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf, dl):
        return idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * dl / avgdl))

    assert got == pytest.approx([term(1, 2), 0.0, term(2, 4)])
    assert bm25_scores(["absent"], docs).tolist() == [0.0, 0.0, 0.0]
    assert bm25_scores([], docs).tolist() == [0.0, 0.0, 0.0]


def test_zscore_and_blend():
    assert zscore(np.array([1.0, 2.0, 3.0])) == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert zscore(np.array([0.5, 0.5])).tolist() == [0.0, 0.0]  # constant: no signal, no NaN
    dense, lex = np.array([0.9, 0.8, 0.7]), np.array([0.0, 0.0, 5.0])
    assert np.argmax(blend(dense, lex, 0.0)) == 0
    assert np.argmax(blend(dense, lex, 0.6)) == 2
    # a query without lexical overlap keeps the dense order whatever the weight
    assert np.argsort(-blend(dense, np.zeros(3), 0.9)).tolist() == [0, 1, 2]


def test_thresholds_follow_the_query_distribution():
    clear = np.array([5.0, 1.0, 0.9, 0.8, 0.7, 0.6])  # one standout
    flat = np.array([1.0, 0.98, 0.96, 0.94, 0.92, 0.9])  # nothing stands out
    assert margin_cut(clear, 1.0) == 1
    assert margin_cut(flat, 1.0) == 2  # std 0.034: within 0.034 of the top
    assert margin_cut(flat, 2.0) == 4
    assert zscore_cut(clear, 1.0) == 1
    assert zscore_cut(flat, 3.0) == 1  # the top always counts
    assert gap_cut(clear, 5) == 1
    assert gap_cut(np.array([3.0, 2.9, 2.8, 1.0, 0.9]), 5) == 3
    # scale-free: the same shape cuts at the same place whatever the units
    assert margin_cut(clear * 100 + 7, 1.0) == margin_cut(clear, 1.0)
    assert margin_cut(np.array([]), 1.0) == gap_cut(np.array([]), 5) == 0


def test_cut_never_keeps_more_than_asked():
    flat = np.linspace(1.0, 0.9, 50)
    for threshold in ("margin", "zscore", "gap", "none"):
        assert 1 <= cut(flat, AdaptiveConfig(threshold=threshold, margin=10, z=-10), 5) <= 5
    assert cut(flat, AdaptiveConfig(threshold="none"), 3) == 3


def test_confidence():
    standout = np.array([0.45] + [0.1] * 49)
    noise = np.linspace(0.3, 0.2, 50)
    assert is_confident(standout, confidence_z=2.0, min_cosine=0.5)
    assert not is_confident(noise, confidence_z=2.0, min_cosine=0.5)
    assert is_confident(noise + 0.4, confidence_z=2.0, min_cosine=0.5)  # close in absolute terms
    assert not is_confident(np.array([]), 2.0, 0.5)


def test_mean_top_similarity_by_hand_and_without_itself():
    """A point's hubness is the mean of its k largest inner products with the pool, its own row left out."""
    pool = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    # row 0 against the others: 0.8, 0, -1 -> the top 2 are 0.8 and 0
    assert mean_top_similarity(pool, pool, 2, np.arange(4))[0] == pytest.approx(0.4)
    # without excluding itself, its own 1.0 counts
    assert mean_top_similarity(pool[:1], pool, 2)[0] == pytest.approx(0.9)
    # k larger than the pool: the mean of all there are; an empty pool: 0
    assert mean_top_similarity(pool[:1], pool[1:2], 5)[0] == pytest.approx(0.8)
    assert mean_top_similarity(pool[:1], pool[:1], 5, np.array([0]))[0] == 0.0
    # chunking changes nothing
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    assert np.allclose(mean_top_similarity(x, x, 3, np.arange(50), chunk=7), mean_top_similarity(x, x, 3, np.arange(50)))


def test_hubness_correction_demotes_a_hub():
    """A hub is close to the query only because it is close to everything: CSLS puts the
    specific document first even though its cosine is a little lower."""
    cands = [[Hit("hub#0", "hub", 0, "hub", 0.62, hubness=0.55), Hit("answer#0", "answer", 0, "answer", 0.60, hubness=0.20),
              Hit("far#0", "far", 0, "far", 0.30, hubness=0.20)]]
    r = AdaptiveRetriever(store=None, config=AdaptiveConfig(fine="hubness", hubness_weight=0.5))
    (ranked,) = r.fine_stage(["q"], np.zeros((1, 4)), cands)
    assert [h.doc_id for h in ranked] == ["answer", "hub", "far"]
    assert ranked[0].hubness == 0.20 and ranked[0].coarse_score == 0.60
    assert hubness_corrected([0.62, 0.60], [0.55, 0.20], 0.0).tolist() == pytest.approx(zscore([0.62, 0.60]).tolist())
    (ranked,) = AdaptiveRetriever(store=None, config=AdaptiveConfig(fine="dense")).fine_stage(["q"], np.zeros((1, 4)), cands)
    assert ranked[0].doc_id == "hub"


def test_invalid_config_names():
    with pytest.raises(ValueError, match="median is not a valid threshold"):
        AdaptiveConfig(threshold="median")
    with pytest.raises(ValueError, match="colbert is not a valid fine signal"):
        AdaptiveConfig(fine="colbert")
    with pytest.raises(ValueError, match="hubness_weight"):
        AdaptiveConfig(hubness_weight=-1)


# ---------------------------------------------------------------- stages over a tiny index

TEXTS = {
    "tcp": "TCP provides reliable ordered delivery of a byte stream on top of IP.",
    "udp": "UDP sends datagrams on top of IP without delivery guarantees.",
    "cache": "A cache memory keeps recently used data close to the processor.",
    "vm": "Virtual memory maps addresses of a process onto physical memory and disk.",
}


class TenantIndex:
    """The in-memory store these unit tests need: exact cosine with a tenant filter."""

    def __init__(self, docs: dict[str, tuple[str, np.ndarray]]):
        self.docs = docs
        self.calls: list[tuple[int, str, bool]] = []

    def search(self, vectors, top_k, *, tenant="", include_synthetic=True, with_vectors=False):
        self.calls.append((len(vectors), tenant, include_synthetic))
        ids = [d for d, (t, _) in self.docs.items() if t == tenant]
        mat = np.stack([self.docs[d][1] for d in ids])
        out = []
        for v in vectors:
            s = mat @ v
            order = np.argsort(-s)[:top_k]
            out.append([Hit(f"{ids[i]}#0", ids[i], 0, TEXTS.get(ids[i], ids[i]), float(s[i]), tenant=tenant,
                            vector=mat[i] if with_vectors else None) for i in order])
        return out


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_fine_stage_reranks_by_lexical_evidence_and_keeps_both_scores():
    """Two candidates tie on cosine; the one sharing the query's rare terms wins the fine stage."""
    cands = [[Hit("udp#0", "udp", 0, TEXTS["udp"], 0.80), Hit("tcp#0", "tcp", 0, TEXTS["tcp"], 0.80),
              Hit("vm#0", "vm", 0, TEXTS["vm"], 0.30)]]
    r = AdaptiveRetriever(store=None, config=AdaptiveConfig(fine="bm25", bm25_weight=0.5))
    (ranked,) = r.fine_stage(["reliable ordered byte stream"], np.zeros((1, 4)), cands)
    assert [h.doc_id for h in ranked] == ["tcp", "udp", "vm"]
    assert isinstance(ranked[0], RankedHit)
    assert ranked[0].coarse_score == ranked[0].score == 0.80
    assert ranked[0].fine_score > ranked[1].fine_score > ranked[2].fine_score
    dense_only = AdaptiveRetriever(store=None, config=AdaptiveConfig(fine="dense"))
    (ranked,) = dense_only.fine_stage(["reliable ordered byte stream"], np.zeros((1, 4)), cands)
    assert [h.doc_id for h in ranked] == ["udp", "tcp", "vm"]  # ties keep the store's order


def test_batched_search_one_store_call_per_tenant_and_no_confident_context():
    """A micro-batch of three queries over two tenants makes two store calls. A query whose
    vector matches nothing in its tenant gets an empty list (no confident context)."""
    rng = np.random.default_rng(0)
    base = {d: unit(rng.normal(size=16)) for d in ["tcp", "udp", "cache", "vm"]}
    docs = {d: ("a", v) for d, v in base.items()}
    docs.update({f"b-{i}": ("b", unit(rng.normal(size=16))) for i in range(30)})
    store = TenantIndex(docs)
    r = AdaptiveRetriever(store, config=AdaptiveConfig(coarse_k=50, threshold="margin", margin=1.0,
                                                     confidence_z=3.5, min_cosine=0.9))
    noise = unit(rng.normal(size=16))
    qv = np.stack([base["cache"], base["vm"], noise])
    out = r.search(["cache memory", "virtual memory", "anything"], qv, tenants=["a", "a", "b"])
    assert sorted(store.calls) == [(1, "b", True), (2, "a", True)]
    assert out[0][0].doc_id == "cache" and out[1][0].doc_id == "vm"
    assert all(len(hits) <= 5 for hits in out)
    assert out[2] == []


def test_retrieve_protocol_respects_each_querys_top_k():
    rng = np.random.default_rng(1)
    vecs = np.stack([unit(rng.normal(size=8)) for _ in range(20)])
    idx = NumpyIndex([f"d{i}" for i in range(20)], vecs, [f"text {i}" for i in range(20)])
    r = AdaptiveRetriever(idx, config=AdaptiveConfig(threshold="none", min_cosine=0.0))
    hits, ms = r.retrieve(["q1", "q2"], vecs[:2], [1, 3], ["", ""], [True, True])
    assert [len(h) for h in hits] == [1, 3]
    assert hits[0][0].doc_id == "d0" and hits[1][0].doc_id == "d1"
    assert set(ms) == {"search", "fine"}


def test_numpy_index_is_exact_cosine():
    rng = np.random.default_rng(2)
    vecs = np.stack([unit(rng.normal(size=8)) for _ in range(30)])
    q = unit(rng.normal(size=8))[None]
    (hits,) = NumpyIndex([str(i) for i in range(30)], vecs, ["t"] * 30).search(q, 5)
    expected = np.argsort(-(vecs @ q[0]))[:5]
    assert [h.doc_id for h in hits] == [str(i) for i in expected]
    assert [h.score for h in hits] == pytest.approx((vecs @ q[0])[expected].tolist(), rel=1e-5)
    # each hit carries its hubness over the whole index (20 nearest others)
    others = np.sort(np.delete(vecs @ vecs[expected[0]], expected[0]))[-20:]
    assert hits[0].hubness == pytest.approx(float(others.mean()), rel=1e-5)


def test_served_top_k_returns_what_the_service_cites():
    """The eval system for plain top-k: at most top_k ids, none under min_score, whatever depth is asked."""
    from hybridrag.agents.retention.adaptive_retriever import served_top_k_factory

    vecs = np.eye(6, dtype=np.float32)
    q = unit([1.0, 0.5, 0.1, 0.0, 0.0, 0.0])[None]
    retrieve = served_top_k_factory(top_k=3, min_score=0.2)([f"d{i}" for i in range(6)], vecs, ["t"] * 6)
    assert retrieve(["q"], q, 100) == [["d0", "d1"]]  # d2's cosine is 0.09


def test_query_bank_is_a_ring_per_tenant():
    bank = QueryBank(size=3)
    assert bank.count("a") == 0 and bank.get("a").shape == (0, 0)
    bank.add(np.arange(8, dtype=np.float32).reshape(4, 2), ["a", "a", "b", "a"])
    assert bank.count("a") == 3 and bank.count("b") == 1
    bank.add(np.array([[9, 9]], np.float32), ["a"])  # overwrites the oldest of a
    assert sorted(map(tuple, bank.get("a").tolist())) == [(2, 3), (6, 7), (9, 9)]


def test_query_bank_keeps_at_most_max_tenants_dropping_the_least_recently_served():
    """A fourth tenant displaces the one served least recently; the gauge follows, one label per banked tenant."""
    from hybridrag.agents.kafka import metrics

    r = AdaptiveRetriever(store=None, config=AdaptiveConfig(query_bank_size=2, query_bank_tenants=3))
    v = np.ones((1, 4), np.float32)
    for t in ["ta", "tb", "tc", "ta"]:
        r.learn(v, [t])
    r.learn(v, ["td"])  # tb was served least recently
    assert r.bank.tenants() == ["tc", "ta", "td"]
    assert r.bank.count("tb") == 0 and r.bank.count("ta") == 2
    assert r.bank.add(np.ones((2, 4), np.float32), ["te", "tf"]) == ["tc", "ta"]
    labels = {s.labels["tenant"]: s.value for s in metrics.QUERY_BANK.collect()[0].samples}
    assert "tb" not in labels and labels["ta"] == 2 and labels["td"] == 1


def test_served_queries_demote_a_passage_that_sits_near_all_of_them():
    """Two passages tie on cosine and on corpus hubness. One lies near every question served so far
    (a hub for questions); once the bank holds enough queries, the other ranks first. The batch
    being served is banked only after its own re-score."""
    rng = np.random.default_rng(5)
    past = np.stack([unit(rng.normal(size=16) * 0.3 + np.eye(16)[0]) for _ in range(30)])  # questions about axis 0
    hub = unit(np.eye(16)[0] + np.eye(16)[1])  # near all of them
    answer = unit(np.eye(16)[1] + np.eye(16)[2])
    q = unit(np.eye(16)[1] + 0.5 * np.eye(16)[0] + 0.5 * np.eye(16)[2])
    cands = [[Hit("hub#0", "hub", 0, "hub", float(q @ hub), vector=hub), Hit("answer#0", "answer", 0, "a", float(q @ answer), vector=answer),
              Hit("far#0", "far", 0, "far", 0.0, vector=unit(np.eye(16)[5]))]]
    assert cands[0][0].score == pytest.approx(cands[0][1].score)
    r = AdaptiveRetriever(store=None, config=AdaptiveConfig(fine="hubness", query_bank_weight=0.5, query_bank_min=20))
    r.bank.add(past[:10], [""] * 10)  # too few: the bank term is off and the store's order stands
    assert [h.doc_id for h in r.fine_stage(["q"], q[None], cands)[0]][:2] == ["hub", "answer"]
    r.bank.add(past[10:], [""] * 20)
    assert [h.doc_id for h in r.fine_stage(["q"], q[None], cands)[0]][:2] == ["answer", "hub"]
    # another tenant's bank is empty
    assert [h.doc_id for h in r.fine_stage(["q"], q[None], cands, tenants="other")[0]][:2] == ["hub", "answer"]
    # retrieve() re-scores first, then banks the batch
    store = TenantIndex({"hub": ("", hub), "answer": ("", answer)})
    r2 = AdaptiveRetriever(store, config=AdaptiveConfig(fine="hubness", threshold="none", min_cosine=0.0))
    r2.retrieve(["q"], q[None], [5], [""], [True])
    assert r2.bank.count("") == 1
    assert AdaptiveRetriever(store, config=AdaptiveConfig(fine="dense")).uses_bank is False


def _hit(id_, score, vector=None):
    from hybridrag.agents.rag.store import Hit

    return Hit(id=id_, doc_id=id_, chunk=0, text=id_, score=score, vector=vector)


def test_fuse_ranks_a_lexical_only_match_with_its_own_cosine():
    """A row only BM25 found gets its cosine from its stored vector; with weight on BM25 it can lead."""
    from hybridrag.agents.retention.adaptive_retriever import fuse

    q = np.array([1.0, 0.0], np.float32)
    dense = [_hit("a", 0.9), _hit("b", 0.8), _hit("c", 0.7)]
    lexical = [_hit("rare", 12.0, vector=np.array([0.5, 0.5], np.float32)), _hit("b", 2.0)]
    only_dense = fuse(dense, lexical, 0.0, q, depth=10)
    assert [h.id for h in only_dense][:3] == ["a", "b", "c"]
    mixed = fuse(dense, lexical, 0.8, q, depth=10)
    assert mixed[0].id == "rare" and mixed[0].score == pytest.approx(0.5) and mixed[0].lexical_score == 12.0
    # a dense-only row scores BM25 0 when the lexical list is shorter than the depth (nothing else matched)
    assert {h.id: h.lexical_score for h in mixed}["a"] == 0.0


def test_pseudo_queries_never_leave_the_query_inside_its_passage():
    """ICT for passages of several sentences, cropping for one-sentence passages; the query is cut out."""
    from hybridrag.agents.retention.adaptive_retriever import pseudo_queries

    texts = ["The kernel schedules processes. A child process is a copy of its parent. Signals interrupt it.",
             "hash table with open addressing and linear probing for collisions"]
    triples = pseudo_queries(texts, 10, seed=3)
    assert {i for i, _, _ in triples} == {0, 1}
    for i, q, rest in triples:
        assert q not in rest and len(q.split()) >= 2
        assert sorted((q + " " + rest).split()) == sorted(texts[i].split())


def test_pick_weight_prefers_a_plateau_over_a_lone_spike():
    from hybridrag.agents.retention.adaptive_retriever import pick_weight

    curve = np.array([0.50, 0.60, 0.62, 0.61, 0.40, 0.65, 0.40])
    assert pick_weight(curve, tuple(range(7))) == 2


def test_choose_fusion_weight_leans_on_bm25_when_the_encoder_knows_nothing():
    """With vectors that carry no meaning, only BM25 finds a pseudo-query's passage: the weight goes up."""
    from hybridrag.agents.retention.adaptive_retriever import choose_fusion_weight

    rng = np.random.default_rng(0)
    vocab = [f"term{i}" for i in range(2000)]
    common = [f"filler{i}" for i in range(20)]
    texts = []
    for _ in range(300):  # each passage has topic words its sentences share, as real passages do
        topic = rng.choice(vocab, 5)
        sentences = [" ".join([*rng.choice(topic, 3), *rng.choice(common, 3)]).capitalize() for _ in range(3)]
        texts.append(". ".join(sentences) + ".")

    def noise(batch):
        v = rng.standard_normal((len(batch), 16)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    choice = choose_fusion_weight(texts, noise(texts), noise, n_queries=100)
    assert choice is not None and choice.queries == 100
    assert choice.weight >= 0.5 and choice.curve[choice.weight] > choice.curve[0.0] + 0.2
