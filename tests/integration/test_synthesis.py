"""The synthesizer with the real encoder and the shipped diffusion checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from hybridrag.agents.synthesis.quality_filter import FilterConfig, matrix_store_search
from hybridrag.agents.synthesis.expansion import ExpansionConfig, expansion_retriever
from hybridrag.agents.synthesis.synthesizer import (
    SynthesisConfig,
    Synthesizer,
    load_prior,
    load_text_model,
    prior_path,
    text_model_path,
)

pytestmark = pytest.mark.integration

QUERIES = [("q-1", "compiler"), ("q-2", "what is a hurricane")]


@pytest.fixture(scope="module")
def encoder():
    from hybridrag.models.encoders import OriginalEncoder

    return OriginalEncoder()


@pytest.fixture(scope="module")
def synthesizer(encoder):
    if not prior_path(encoder.version).exists() or not text_model_path().exists():
        pytest.fail("the diffusion checkpoints must ship in models/checkpoints/")
    return Synthesizer(encoder, load_text_model(), load_prior(encoder), FilterConfig(),
                       SynthesisConfig(text_steps=16, prior_steps=5, seed=0))


@pytest.fixture(scope="module")
def docs(synthesizer):
    return synthesizer.synthesize(QUERIES, n_per_query=3)


def test_every_sample_carries_its_provenance_and_verdict(synthesizer, docs, encoder):
    """Two queries x 3 samples x 2 models: each sample says what made it, for which query, and why it was dropped."""
    assert len(docs) == 12
    assert [d.query_id for d in docs] == ["q-1"] * 6 + ["q-2"] * 6
    assert {d.kind for d in docs} == {"text", "embedding"}
    q_vecs = encoder.encode([t for _, t in QUERIES])
    for d in docs:
        assert d.encoder_version == encoder.version
        assert d.model_version == (synthesizer.text_model.version if d.kind == "text" else synthesizer.prior.version)
        assert d.embedding.shape == (384,) and abs(np.linalg.norm(d.embedding) - 1) < 1e-3
        assert d.kept == (d.reasons == [])
        q = q_vecs[0 if d.query_id == "q-1" else 1]
        assert d.scores["query_similarity"] == pytest.approx(float(d.embedding @ q), abs=1e-4)
        if d.kind == "text":
            assert isinstance(d.text, str) and d.scores["words"] is not None
            # the stored embedding is the encoder's reading of the text
            np.testing.assert_allclose(d.embedding, encoder.encode([d.text])[0], atol=1e-4)
        else:
            assert d.text is None and d.scores["words"] is None
    assert d.as_dict()["embedding"][:3] == pytest.approx(d.embedding[:3].tolist())


def test_the_same_seed_gives_the_same_samples(synthesizer, docs):
    again = synthesizer.synthesize(QUERIES, n_per_query=3)
    assert [d.text for d in again] == [d.text for d in docs]
    np.testing.assert_allclose(np.stack([d.embedding for d in again]), np.stack([d.embedding for d in docs]), atol=1e-5)


def test_a_sample_already_in_the_store_is_dropped_as_a_duplicate(synthesizer, docs, encoder):
    # any text sample will do: the filter records every reason, not only the first
    stored = next(d for d in docs if d.kind == "text")
    s = Synthesizer(encoder, synthesizer.text_model, None, FilterConfig(), synthesizer.config,
                    store_search=matrix_store_search(stored.embedding[None]))
    again = [d for d in s.synthesize(QUERIES, n_per_query=3) if d.text == stored.text]
    assert again and all("duplicate_store" in d.reasons for d in again)


def test_a_prior_from_another_encoder_is_refused(synthesizer):
    class OtherEncoder:
        version, dim = "someone-else", 384

        def encode(self, texts, batch_size=64):
            return np.zeros((len(texts), 384), np.float32)

    with pytest.raises(ValueError, match="belongs to encoder"):
        Synthesizer(OtherEncoder(), None, synthesizer.prior)


def test_expansion_retriever_ranks_with_expanded_queries(synthesizer, encoder):
    import torch

    torch.manual_seed(0)  # the sampler draws from torch's global generator, which earlier tests advance
    docs_text = ["a program that translates source code into machine code", "a violent tropical storm",
                 "a small domesticated cat", "the capital city of France"]
    doc_vecs = encoder.encode(docs_text)
    retrieve = expansion_retriever(synthesizer.prior, ExpansionConfig(k=2, steps=5))(["a", "b", "c", "d"], doc_vecs, docs_text)
    ranked = retrieve(["compiler", "hurricane"], encoder.encode(["compiler", "hurricane"]), 2)
    assert [r[0] for r in ranked] == ["a", "b"]


CONTEXTS = ["compiler: a program that converts another program from some source language to machine language.",
            "An interpreter executes a program one statement at a time."]


def test_text_samples_rewrite_their_own_context_and_record_the_edit_rate(synthesizer, encoder):
    """Query 1 has two passages (sample j rewrites passage j mod 2), query 2 none (written from scratch)."""
    s = Synthesizer(encoder, synthesizer.text_model, None, FilterConfig(),
                    SynthesisConfig(text_steps=16, seed=0, strength=0.5))
    docs = s.synthesize(QUERIES, n_per_query=3, contexts=[CONTEXTS, []])
    assert [d.query_id for d in docs] == ["q-1"] * 3 + ["q-2"] * 3
    with_ctx, scratch = docs[:3], docs[3:]
    seen = [d.context for d in with_ctx]
    assert seen[0] == seen[2] != seen[1]  # passages 0, 1, 0
    assert seen[0].startswith("compiler: a program") and seen[1].startswith("an interpreter")
    for d in with_ctx:
        assert 0.0 <= d.scores["context_edit_rate"] <= 1.0
        copy = d.scores["context_edit_rate"] < FilterConfig().min_context_edit_rate
        assert ("copy_of_context" in d.reasons) == copy
    assert all(d.context is None and d.scores["context_edit_rate"] is None for d in scratch)
    # a query without passages gets what the from-scratch path gives it (one sampler batch per kind of start)
    plain = s.synthesize(QUERIES[1:], n_per_query=3)
    assert [d.text for d in plain if d.kind == "text"] == [d.text for d in scratch]


def test_a_rewrite_that_keeps_its_context_is_dropped_as_a_copy(synthesizer, encoder):
    """At a tiny strength almost nothing is masked: the samples are their context, and the filter says so."""
    s = Synthesizer(encoder, synthesizer.text_model, None, FilterConfig(),
                    SynthesisConfig(text_steps=16, seed=0, strength=0.02))
    docs = s.synthesize(QUERIES[:1], n_per_query=2, contexts=[CONTEXTS])
    assert all("copy_of_context" in d.reasons and d.scores["context_edit_rate"] < 0.2 for d in docs)
