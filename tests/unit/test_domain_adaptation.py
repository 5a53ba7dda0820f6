"""Domain adaptation: pseudo-queries, hold-out, mining, pseudo-labels, and a tiny end-to-end adaptation."""

import json

import numpy as np
import pytest
import torch

from hybridrag.agents.retention import domain_adaptation as da
from hybridrag.models.hybrid_encoder import Config, HybridEncoder, load_checkpoint, save_checkpoint

PASSAGES = [
    ("open", "The open call opens the file named by pathname. It may create the file when asked to. "
             "A file descriptor is returned on success."),
    ("close", "The close call closes a file descriptor so that it no longer refers to any file. "
              "Locks held on the file are removed."),
    ("read", "The read call attempts to read up to count bytes from a file descriptor into the buffer. "
             "On files that support seeking, the read starts at the file offset."),
    ("fork", "The fork call creates a new process by duplicating the calling process. "
             "The child process and the parent run in separate memory spaces."),
    ("kill", "The kill call sends any signal to any process group or process. "
             "If pid is positive, the signal is sent to the process with that ID."),
    ("pipe", "The pipe call creates a unidirectional data channel for interprocess communication. "
             "The array returns two file descriptors referring to the ends of the pipe."),
]


def corpus() -> da.Corpus:
    return da.Corpus([f"d{i}" for i in range(len(PASSAGES))], [t for _, t in PASSAGES], [n for n, _ in PASSAGES],
                     [n for n, _ in PASSAGES])


def test_pseudo_queries_are_sentences_and_titles_of_their_passage():
    pairs = da.pseudo_queries(corpus(), "ict+title", per_passage=2, min_words=4, seed=0)
    kinds = {p.kind for p in pairs}
    assert kinds == {"ict", "title"}
    for p in pairs:
        assert p.query in PASSAGES[p.passage][1] or p.query == PASSAGES[p.passage][0]
    assert sum(p.kind == "title" for p in pairs) == len(PASSAGES)
    assert all(p.kind == "ict" for p in da.pseudo_queries(corpus(), "ict"))
    one_sentence = da.Corpus(["x"], ["Transmission Control Protocol; TCP (networking, protocol)"], [""], ["x"])
    assert da.pseudo_queries(one_sentence, "ict+title") == []


def test_holdout_splits_by_passage():
    pairs = da.pseudo_queries(corpus(), "ict+title", seed=0)
    train, held = da.split_holdout(pairs, len(PASSAGES), 0.5, seed=3)
    assert len(train) + len(held) == len(pairs)
    assert not {p.passage for p in train} & {p.passage for p in held}


def test_mined_negatives_are_never_the_positive_or_its_group():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(20, 8)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    groups = [f"g{i // 2}" for i in range(20)]  # pairs of passages share a group
    pos = np.arange(20)
    neg = da.mine_negatives(docs, docs, pos, groups, depth=5, skip=0, seed=0)
    assert all(groups[n] != groups[p] for p, n in zip(pos, neg))
    # the query is its own passage: its nearest other-group passages come first
    sims = docs @ docs.T
    for p, n in zip(pos, neg):
        allowed = [d for d in np.argsort(-sims[p])[:5] if groups[d] != groups[p]]
        assert n in allowed or not allowed


def test_pseudo_margins_by_labeller():
    dense = np.array([[0.8, 0.6], [0.5, 0.7]], np.float32)
    bm25 = np.array([[4.0, 0.0], [0.0, 2.0]], np.float32)
    best = np.array([4.0, 4.0], np.float32)
    assert np.allclose(da.pseudo_margins("dense", dense, bm25, best, 0.5), [0.2, -0.2])
    assert np.allclose(da.pseudo_margins("bm25", dense, bm25, best, 0.5), [1.0, -0.5])
    assert np.allclose(da.pseudo_margins("ensemble", dense, bm25, best, 0.5), [0.7, -0.45])
    assert np.allclose(da.pseudo_margins("infonce", dense, bm25, best, 0.5), 0.0)


def test_heldout_ndcg_of_one_relevant_passage():
    q = np.eye(3, dtype=np.float32)
    d = np.eye(3, dtype=np.float32)
    assert np.allclose(da.heldout_ndcg(q, d, np.array([0, 1, 2])), 1.0)
    # the positive ranks second: 1 / log2(3)
    d2 = np.array([[0.9, 0.1, 0], [1.0, 0, 0], [0, 0, 1]], np.float32)
    assert np.isclose(da.heldout_ndcg(q[:1], d2, np.array([0]))[0], 1 / np.log2(3))


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="valid mode"):
        da.AdaptConfig(mode="lora")
    with pytest.raises(ValueError, match="valid labels"):
        da.AdaptConfig(labels="cross-encoder")


def test_corpus_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text('{"_id": "a", "text": "fine"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2"):
        da.Corpus.from_jsonl(p)


@pytest.mark.parametrize("mode", ["branch", "head", "full"])
def test_a_tiny_adaptation_trains_only_its_part_and_writes_a_checkpoint(tmp_path, mode):
    """A tiny encoder adapts to six passages: the frozen part keeps its weights, the checkpoint reloads."""
    torch.manual_seed(0)
    base = HybridEncoder(Config(vocab_size=30522, d_model=32, n_heads=4, n_layers=2, d_ff=64, out_dim=32,
                                max_positions=128, max_seq_len=64, conv_kernels=()))
    base_path = tmp_path / "base.pt"
    save_checkpoint(base_path, base, step=0)
    base, _ = load_checkpoint(base_path)
    cfg = da.AdaptConfig(mode=mode, minutes=1.0, max_steps=6, batch_size=4, holdout=0.0, replay_per_step=2,
                         mine_depth=4, mine_skip=0)
    adapter = da.DomainAdapter(corpus(), base_path, cfg, replay_texts=["a general text", "another one here"])
    adapter.prepare()
    model, history, _ = adapter.train()
    assert len(history) == 6 and all(np.isfinite(h["loss"]) for h in history)
    block = "blocks.0.ff_in.weight"
    moved = not torch.equal(model.state_dict()[block], base.state_dict()[block])
    assert moved == (mode == "full")
    assert not torch.equal(model.out.weight, base.out.weight)
    result = adapter.save(model, tmp_path / "adapted.pt", cfg, history, 1.0, {})
    reloaded, meta = load_checkpoint(result.checkpoint)
    assert meta["metrics"]["adapt"]["mode"] == mode and result.version != result.base_version
    assert reloaded.cfg.conv_position == ("branch" if mode == "branch" else "input")
    # the cached path and the full forward agree on the adapted corpus
    if mode != "full":
        cached = adapter.corpus_vectors(model, mode)
        direct = da.encode_states(model, adapter.doc_ids)[1]
        assert np.allclose(cached, direct, atol=1e-5)
