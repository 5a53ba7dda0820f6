"""The continual learner's pure logic: promotion, batch composition, gradient accumulation, examples, results."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybridrag.agents.retention.continual_learner import (
    ContinualLoss,
    Example,
    LearnerConfig,
    PoolSampler,
    Replay,
    UpdateResult,
    accumulate_gradients,
    compose_micro_batch,
    examples_from_messages,
    replay_split,
    should_promote,
)
from hybridrag.agents.kafka.schemas import GeneratedDocument, RetentionUpdate, decode, encode
from hybridrag.models.hybrid_encoder import Config, HybridEncoder
from hybridrag.models.train_encoder import Batch, pad


def test_promotion_rule_allows_a_loss_within_the_tolerance_only():
    """A new version is promoted iff its canary nDCG@10 is at least the base's minus the tolerance."""
    assert should_promote(0.40, 0.40, 0.01)
    assert should_promote(0.45, 0.40, 0.0)
    assert should_promote(0.391, 0.40, 0.01)
    assert not should_promote(0.389, 0.40, 0.01)
    assert not should_promote(0.3999, 0.40, 0.0)


def test_replay_split_gives_the_configured_share_and_never_more_than_exists():
    """16 x 0.5 -> 8 new + 8 replayed; a replay pool of 3 caps the replayed share; no pool, no replay."""
    assert replay_split(16, 0.5, 1000) == (8, 8)
    assert replay_split(16, 0.25, 1000) == (12, 4)
    assert replay_split(16, 0.5, 3) == (13, 3)
    assert replay_split(16, 0.5, 0) == (16, 0)
    assert replay_split(16, 0.0, 1000) == (16, 0)


def test_every_micro_batch_holds_the_replay_fraction_and_no_duplicate():
    """Over 200 micro-batches of 16 with fraction 0.5, each holds 8 distinct new and 8 distinct replayed
    items, and every new item is drawn equally often (one pass over the pool before any repeats)."""
    rng = random.Random(0)
    new, replay = PoolSampler(40, rng), PoolSampler(1000, rng)
    counts = [0] * 40
    for _ in range(200):
        n, r = compose_micro_batch(new, replay, 16, 0.5)
        assert len(n) == 8 and len(r) == 8
        assert len(set(n)) == 8 and len(set(r)) == 8
        for i in n:
            counts[i] += 1
    assert counts == [40] * 40  # 200 * 8 / 40


def test_a_pool_smaller_than_its_share_is_drawn_once_per_batch():
    """Three new pairs and a share of 8: each batch holds each pair once (in-batch negatives stay distinct)."""
    n, r = compose_micro_batch(PoolSampler(3, random.Random(1)), PoolSampler(50, random.Random(2)), 16, 0.5)
    assert sorted(n) == [0, 1, 2] and len(r) == 8
    n, r = compose_micro_batch(PoolSampler(0, random.Random(1)), PoolSampler(50, random.Random(2)), 16, 0.5)
    assert n == [] and len(r) == 16  # nothing new of this kind: replay fills the batch
    n, r = compose_micro_batch(PoolSampler(5, random.Random(1)), None, 16, 0.5)
    assert sorted(n) == [0, 1, 2, 3, 4] and r == []


def test_the_sampler_is_seeded():
    a, b = PoolSampler(30, random.Random(7)), PoolSampler(30, random.Random(7))
    assert [a.take(8) for _ in range(10)] == [b.take(8) for _ in range(10)]


def _tiny_model(seed: int = 0) -> HybridEncoder:
    torch.manual_seed(seed)
    return HybridEncoder(Config(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                max_positions=32, max_seq_len=32, conv_kernels=(3,), out_dim=16))


def _batch(seqs: list[list[int]], targets: torch.Tensor) -> Batch:
    ids, mask = pad(seqs)
    return Batch(ids, mask, targets, None, None, None, None, None, None)


def test_gradient_accumulation_equals_one_big_batch():
    """Four micro-batches of 4 accumulated (loss / 4 each) give the gradient of one batch of 16, for the
    per-example distillation loss (the in-batch terms depend on the batch by design, so they are off here)."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (16,), generator=g)]
    targets = torch.nn.functional.normalize(torch.randn(16, 16, generator=g), dim=-1)

    big = _tiny_model()
    loss_big = ContinualLoss(big, w_sim=0.0, w_nce=0.0)
    accumulate_gradients(loss_big, [_batch(seqs, targets)])

    small = _tiny_model()
    loss_small = ContinualLoss(small, w_sim=0.0, w_nce=0.0)
    parts = accumulate_gradients(loss_small, [_batch(seqs[i : i + 4], targets[i : i + 4]) for i in range(0, 16, 4)])

    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert parts["nce"] == 0.0 and parts["loss"] > 0


def test_the_loss_takes_batches_with_and_without_pairs():
    """A batch of texts alone trains on distillation; with pairs, the contrastive term joins in."""
    model = _tiny_model()
    fn = ContinualLoss(model)
    t = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    loss, parts = fn(_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], t))
    assert parts["nce"] == 0.0 and torch.isfinite(loss)
    ids, mask = pad([[1, 2], [3, 4, 5], [6]])
    b = Batch(*pad([[1, 2, 3], [4, 5]]), t[:2], ids, mask, t[:3], ids, mask, t[:3])
    loss, parts = fn(b)
    assert parts["nce"] > 0 and torch.isfinite(loss)


def _gen(doc_id: str, query_id: str, query: str, text: str = "", kept: bool = True) -> GeneratedDocument:
    return GeneratedDocument(query_id=query_id, query=query, doc_id=doc_id, text=text,
                             embedding=[] if text else [0.1] * 4, kept=kept, encoder_version="hybrid-x")


def test_only_kept_text_samples_are_pairs_and_each_query_is_distilled_once():
    """Kept text -> a pair; dropped text and embedding-only samples -> not examples, but their query is
    (one query-only example per query id); with distil_queries off, only the pairs remain."""
    msgs = [
        _gen("g1", "q1", "what is a compiler", "a program that translates"),
        _gen("g2", "q1", "what is a compiler", "the the the", kept=False),
        _gen("g3", "q2", "what is tcp"),  # embedding-only
        _gen("g4", "q3", "", "text without its query"),
    ]
    examples, skipped = examples_from_messages(msgs)
    assert [e.doc_id for e in examples if e.is_pair] == ["g1"]
    assert sorted(e.doc_id for e in examples if not e.is_pair) == ["query:q1", "query:q2"]
    assert skipped == {"dropped": 1, "embedding_only": 1, "no_query": 1}
    only_pairs, _ = examples_from_messages(msgs, distil_queries=False)
    assert [e.doc_id for e in only_pairs] == ["g1"]


def test_a_result_maps_to_a_valid_retention_update():
    """Promoted and rejected results become the right RetentionUpdate kinds and survive the wire format."""
    ok = UpdateResult(True, "hybrid-aaa", "hybrid-bbb", "/x/hybrid-bbb.pt", {"canary_base": 0.4, "canary_new": 0.41},
                      "promoted", 12.0)
    msg = ok.to_retention_update()
    assert msg.kind == "encoder-promoted" and msg.encoder_version == "hybrid-bbb"
    assert decode(RetentionUpdate, encode(msg), max_bytes=1 << 20) == msg
    failed = UpdateResult.failed("timed out after 5s", base_version="hybrid-aaa")
    m = failed.to_retention_update()
    assert m.kind == "encoder-rejected" and m.encoder_version == "hybrid-aaa" and "timed out" in m.detail


def test_config_reads_the_settings_and_checks_itself():
    """LearnerConfig.from_settings takes the learner_* fields; nonsense fractions are refused."""
    from hybridrag.agents.settings import Settings

    s = Settings(learner_steps=7, learner_replay_fraction=0.25, redis_prefix="p1", data_dir="/tmp/d")
    cfg = LearnerConfig.from_settings(s)
    assert (cfg.steps, cfg.replay_fraction, cfg.redis_prefix, cfg.data_dir) == (7, 0.25, "p1", "/tmp/d")
    assert cfg.batch_size == s.learner_batch_size and cfg.canary_dataset == s.learner_canary_dataset
    with pytest.raises(ValueError):
        LearnerConfig(replay_fraction=1.0)
    with pytest.raises(ValueError):
        LearnerConfig(replay_target="old")


def test_replay_round_trips_through_the_job_file_form():
    r = Replay(["a", "b"], [("q", "p")], "memory", recent=["c"], recent_pairs=[("q2", "c")])
    assert Replay.from_dict(r.as_dict()) == r
    assert Replay.from_dict(None) is None
    assert Example("g1", "q1", "q", "t").is_pair and not Example("query:q1", "q1", "q").is_pair


def test_paired_interval_brackets_the_mean_change_and_narrows_with_agreement():
    """The canary's 95% interval of the mean change: it contains the observed mean, it is tight when every
    query moves alike, and it spans zero when the changes are symmetric noise."""
    from hybridrag.agents.retention.continual_learner import paired_interval

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    lo, hi = paired_interval(base - 0.02, base)
    assert lo == pytest.approx(-0.02) and hi == pytest.approx(-0.02)  # every query lost exactly 0.02
    noise = rng.choice([-0.1, 0.1], 200)
    lo, hi = paired_interval(base + noise, base)
    assert lo < float(noise.mean()) < hi and lo < 0 < hi
    assert paired_interval(np.array([]), np.array([])) == (0.0, 0.0)
