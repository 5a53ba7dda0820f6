"""Ranking metrics against values worked out by hand, and the pure helpers around them."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrag.agents.evaluation.harness import (
    evaluate_run,
    mrr_at_k,
    ndcg_at_k,
    pearson,
    precision_at_k,
    rank_data,
    recall_at_k,
    spearman,
    top_k_cosine,
)

LOG2_3 = math.log2(3)


def test_ndcg_single_relevant_at_rank_two():
    """One relevant doc at rank 2: DCG = 1/log2(3), ideal DCG = 1."""
    assert ndcg_at_k(["a", "b", "c"], {"b": 1}, 10) == pytest.approx(1 / LOG2_3)


def test_ndcg_two_relevant_at_ranks_one_and_three():
    """DCG = 1 + 1/log2(4) = 1.5; ideal (ranks 1, 2) = 1 + 1/log2(3)."""
    got = ndcg_at_k(["a", "x", "b", "y"], {"a": 1, "b": 1}, 10)
    assert got == pytest.approx(1.5 / (1 + 1 / LOG2_3))


def test_ndcg_graded_gains_use_linear_gain():
    """Grades 2 and 1 swapped: DCG = 1 + 2/log2(3); ideal = 2 + 1/log2(3)."""
    got = ndcg_at_k(["low", "high"], {"high": 2, "low": 1}, 10)
    assert got == pytest.approx((1 + 2 / LOG2_3) / (2 + 1 / LOG2_3))


def test_ndcg_cutoff_ignores_documents_past_k():
    ranked = [f"d{i}" for i in range(10)] + ["rel"]
    assert ndcg_at_k(ranked, {"rel": 1}, 10) == 0.0
    assert ndcg_at_k(ranked, {"rel": 1}, 11) == pytest.approx(1 / math.log2(12))


def test_ndcg_ideal_is_capped_at_k():
    """Three relevant docs, k=2, both top ranks relevant: a perfect score."""
    assert ndcg_at_k(["a", "b", "x"], {"a": 1, "b": 1, "c": 1}, 2) == pytest.approx(1.0)


def test_mrr_takes_the_first_relevant_only():
    assert mrr_at_k(["x", "y", "a", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x"] * 10 + ["a"], {"a": 1}, 10) == 0.0


def test_recall_and_precision():
    ranked = ["a", "x", "b", "y", "z"]
    rels = {"a": 1, "b": 1, "c": 1, "d": 1}
    assert recall_at_k(ranked, rels, 10) == pytest.approx(2 / 4)
    assert recall_at_k(ranked, rels, 1) == pytest.approx(1 / 4)
    assert precision_at_k(ranked, rels, 5) == pytest.approx(2 / 5)
    # fewer ranked than k still divides by k
    assert precision_at_k(["a"], rels, 5) == pytest.approx(1 / 5)


def test_zero_grade_is_not_relevant():
    assert mrr_at_k(["a", "b"], {"a": 0, "b": 1}, 10) == pytest.approx(0.5)
    assert recall_at_k(["a"], {"a": 0, "b": 1}, 10) == 0.0


def test_evaluate_run_averages_and_scores_missing_queries_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": ["a", "x"]}  # q2 never ranked
    m = evaluate_run(run, qrels)
    assert m["nDCG@10"] == pytest.approx(0.5)
    assert m["MRR@10"] == pytest.approx(0.5)
    assert m["R@100"] == pytest.approx(0.5)
    assert m["P@5"] == pytest.approx(0.1)


def test_evaluate_run_refuses_qrels_without_relevant_documents():
    with pytest.raises(ValueError):
        evaluate_run({"q": ["a"]}, {"q": {"a": 0}})


@given(st.permutations(list("abcdefghij")), st.sets(st.sampled_from(list("abcdefghij")), min_size=1))
def test_metrics_stay_in_unit_interval(ranked, relevant):
    rels = {d: 1 for d in relevant}
    for value in (ndcg_at_k(ranked, rels), mrr_at_k(ranked, rels), recall_at_k(ranked, rels, 5),
                  precision_at_k(ranked, rels, 5)):
        assert 0.0 <= value <= 1.0 + 1e-12
    # every document ranked within k=10: recall is complete
    assert recall_at_k(ranked, rels, 10) == 1.0


def test_rank_data_averages_ties():
    np.testing.assert_allclose(rank_data(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])


def test_spearman_and_pearson_by_hand():
    a = [1, 2, 3, 4, 5]
    assert pearson(a, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman(a, [1, 4, 9, 16, 25]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(a, [1, 4, 9, 16, 25]) < 1.0
    # d = (0, 0, 1, -1, 0): rho = 1 - 6*2 / (5*24) = 0.9
    assert spearman(a, [1, 2, 4, 3, 5]) == pytest.approx(0.9)


def test_top_k_cosine_matches_a_full_sort():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    top = top_k_cosine(queries, docs, k=20, chunk=8)
    full = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(top, full)
    assert top_k_cosine(queries, docs[:5], k=20).shape == (37, 5)
