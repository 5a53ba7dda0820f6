"""The quality filter: each drop reason on its own, their combination, and the recorded scores."""

from __future__ import annotations

import numpy as np
import pytest

from hybridrag.agents.synthesis.quality_filter import (
    Candidate,
    FilterConfig,
    cosine_matrix,
    edit_distance,
    edit_rate,
    judge,
    matrix_store_search,
    pass_rate,
    reason_counts,
    repetition_rate,
    unknown_rate,
    words,
)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


Q = unit(1, 0, 0, 0)
GOOD_TEXT = "a machine that performs calculations automatically"


def test_repetition_rate_is_zero_for_distinct_words_and_high_for_loops():
    assert repetition_rate(words("a small red house"), 1) == 0.0
    assert repetition_rate(words("the the the the"), 1) == pytest.approx(0.75)
    assert repetition_rate(words("of the of the of the"), 2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([], 2) == 0.0


def test_unknown_rate_and_words():
    assert unknown_rate(1, 4) == 0.25
    assert unknown_rate(0, 0) == 0.0
    assert words("It's a dog, isn't it?") == ["it's", "a", "dog", ",", "isn't", "it", "?"]


def test_cosine_matrix_normalises_rows():
    m = cosine_matrix(np.array([[2.0, 0.0]]), np.array([[0.0, 3.0], [1.0, 1.0]]))
    np.testing.assert_allclose(m, [[0.0, 2**-0.5]], atol=1e-7)


def test_a_good_sample_is_kept_with_its_scores():
    (d,) = judge(Q, [Candidate(unit(0.9, 0.1, 0, 0), GOOD_TEXT, 0, 8)])
    assert d.kept and d.reasons == []
    assert d.scores.query_similarity == pytest.approx(float(unit(0.9, 0.1, 0, 0) @ Q))
    assert d.scores.words == 6 and d.scores.unknown_rate == 0.0 and d.scores.max_store_similarity is None


def test_off_topic_samples_are_dropped():
    (d,) = judge(Q, [Candidate(unit(0.1, 1, 0, 0), GOOD_TEXT)], FilterConfig(min_query_similarity=0.3))
    assert not d.kept and d.reasons == ["off_topic"]


def test_near_duplicates_keep_the_one_closest_to_the_query():
    near_a = unit(0.9, 0.1, 0, 0)
    near_b = unit(0.9, 0.11, 0, 0)  # cosine to near_a > 0.99
    other = unit(0.8, 0, 0.6, 0)
    ds = judge(Q, [Candidate(near_b, "x y z"), Candidate(near_a, "x y w"), Candidate(other, "p q r")])
    assert [d.kept for d in ds] == [False, True, True]
    assert ds[0].reasons == ["duplicate_sample"] and ds[0].scores.max_sample_similarity > 0.99


def test_near_duplicates_of_stored_documents_are_dropped():
    store = np.stack([unit(0.9, 0.1, 0, 0), unit(0, 0, 0, 1)])
    ds = judge(Q, [Candidate(unit(0.9, 0.1, 0, 0), GOOD_TEXT), Candidate(unit(0.9, 0, 0.4, 0), GOOD_TEXT + " too")],
               store_search=matrix_store_search(store))
    assert ds[0].reasons == ["duplicate_store"] and ds[0].scores.max_store_similarity == pytest.approx(1.0, abs=1e-6)
    assert ds[1].kept and ds[1].scores.max_store_similarity < 0.95


def test_degenerate_texts_are_dropped_with_each_reason():
    v = unit(1, 0.1, 0, 0)
    cands = [
        Candidate(v, "the the the the the the"),
        Candidate(unit(1, 0, 0.2, 0), "a bit of this and that", unknown_tokens=2, total_tokens=6),
        Candidate(unit(1, 0, 0, 0.3), "short"),
        Candidate(unit(1, 0, 0.3, 0.3), "-bee ()"),  # four tokens, one word
    ]
    ds = judge(Q, cands)
    assert ds[0].reasons == ["repetitive"]
    assert ds[1].reasons == ["unknown_tokens"] and ds[1].scores.unknown_rate == pytest.approx(1 / 3)
    assert ds[2].reasons == ["too_short"]
    assert ds[3].reasons == ["too_short"] and ds[3].scores.words == 1
    assert pass_rate(ds) == 0.0
    assert reason_counts(ds) == {"repetitive": 1, "unknown_tokens": 1, "too_short": 2}


def test_every_failing_check_is_recorded():
    store = np.stack([unit(0, 1, 0, 0)])
    (d,) = judge(Q, [Candidate(unit(0, 1, 0, 0), "go go go go", 3, 4)], store_search=matrix_store_search(store))
    assert set(d.reasons) == {"off_topic", "duplicate_store", "repetitive", "unknown_tokens"}
    assert d.as_dict()["kept"] is False and d.as_dict()["scores"]["words"] == 4


def test_embedding_only_samples_skip_the_text_checks():
    (d,) = judge(Q, [Candidate(unit(1, 0.2, 0, 0))])
    assert d.kept and d.scores.words is None and d.scores.unknown_rate is None


def test_a_dropped_sample_does_not_shadow_its_duplicates():
    """Only kept samples count as originals: an off-topic twin must not knock out nothing-but-itself."""
    off = unit(0.2, 1, 0, 0)
    ds = judge(Q, [Candidate(off, GOOD_TEXT), Candidate(off, GOOD_TEXT + " again")], FilterConfig(min_query_similarity=0.5))
    assert ds[0].reasons == ["off_topic"] and ds[1].reasons == ["off_topic"]


def test_empty_input_gives_no_decisions():
    assert judge(Q, []) == [] and pass_rate([]) == 0.0


def test_edit_rate_counts_word_edits_over_the_longer_text():
    assert edit_distance(["a", "b", "c"], ["a", "x", "c", "d"]) == 2  # one substitution, one insertion
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_rate(words("a program that translates code"), words("a program that translates code")) == 0.0
    assert edit_rate(words("a program that compiles code"), words("a program that translates code")) == pytest.approx(1 / 5)
    assert edit_rate(words("x y"), words("a b c d")) == 1.0
    assert edit_rate([], []) == 0.0


def test_a_near_copy_of_its_context_is_dropped_and_a_rewrite_is_kept():
    """A rewrite must change at least min_context_edit_rate of its words; the measured rate is always recorded."""
    context = "a program that translates source code into machine code"
    copy = "a program that translates source code into binary code"  # 1 of 9 words changed
    rewrite = "a tool that turns program text into code a machine runs"
    ds = judge(Q, [Candidate(unit(0.8, 0.6, 0, 0), copy, context=context),
                   Candidate(unit(0.8, 0, 0.6, 0), rewrite, context=context),
                   Candidate(unit(0.8, 0, 0, 0.6), rewrite)])
    assert ds[0].reasons == ["copy_of_context"] and ds[0].scores.context_edit_rate == pytest.approx(1 / 9)
    assert ds[1].kept and ds[1].scores.context_edit_rate >= FilterConfig().min_context_edit_rate
    assert ds[2].kept and ds[2].scores.context_edit_rate is None  # written from scratch: nothing to copy
    (strict,) = judge(Q, [Candidate(unit(1, 0.1, 0, 0), copy, context=context)],
                      FilterConfig(min_context_edit_rate=0.0))
    assert strict.kept


REAL = [
    "a program that translates source code into machine code",
    "the jury said it did find that many of the city's laws are outmoded",
    "a large natural stream of water flowing toward the sea",
    "artificial intelligence is the branch of engineering devoted to constructing machines that think",
]


SPREAD = [unit(1, 1, 0, 0), unit(1, 0, 1, 0), unit(1, 0, 0, 1), unit(1, -1, 0, 0)]  # on topic, not duplicates


def test_shuffled_and_word_salad_texts_are_dropped_as_disfluent_and_real_text_passes():
    """The same words in a random order, or words drawn from anywhere, are dropped as disfluent; the originals pass."""
    import random

    rng = random.Random(0)
    shuffled = []
    for t in REAL:
        w = t.split()
        rng.shuffle(w)
        shuffled.append(" ".join(w))
    vocab = [w for t in REAL for w in t.split()]
    salad = [" ".join(rng.choice(vocab) for _ in range(9)) for _ in range(4)]
    real = judge(Q, [Candidate(v, t) for v, t in zip(SPREAD, REAL)])
    assert all(d.kept for d in real), [d.reasons for d in real]
    assert all(d.scores.order_gain > FilterConfig().min_order_gain for d in real)
    for group in (shuffled, salad):
        ds = judge(Q, [Candidate(v, t) for v, t in zip(SPREAD, group)])
        # a shuffle can keep a pair in order ("machine code"): most, not all, are caught (the bench has the rates)
        assert sum("disfluent" in d.reasons for d in ds) >= 2, [(t, d.scores.order_gain) for t, d in zip(group, ds)]
        assert max(d.scores.order_gain for d in ds) < min(d.scores.order_gain for d in real)
        for d in ds:
            if not d.kept:
                assert d.reasons  # every drop says why


def test_order_gain_is_scored_only_on_texts_with_enough_distinct_words():
    (d,) = judge(Q, [Candidate(Q, "central processing unit")])
    assert d.kept and d.scores.order_gain is None
