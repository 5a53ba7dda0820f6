"""Distillation pieces: teacher init, losses, schedule, batching, the teacher cache, resume."""

import random

import numpy as np
import pytest
import torch

from hybridrag.models.hybrid_encoder import Config, HybridEncoder, HybridEncoderRuntime
from hybridrag.models.train_encoder import (
    Batch,
    Distiller,
    ffn_keep_indices,
    info_nce,
    init_from_teacher,
    length_bucketed,
    lr_at,
    similarity_matrix_loss,
    teacher_embeddings,
    teacher_state_dict,
)


def test_full_width_student_reproduces_the_teacher():
    """Seeded with all six layers, the student *is* MiniLM: its fresh conv block and fusion
    pass the teacher's features through untouched, in FP32 exactly and in BF16 to 1e-3."""
    from hybridrag.models.encoders import OriginalEncoder

    texts = ["A man is playing a guitar.", "The stock market fell sharply on Monday morning.",
             " ".join(["a long passage of many words"] * 60)]
    theirs = OriginalEncoder().encode(texts)
    for precision, tol in (("fp32", 1e-4), ("bf16", 1e-3)):
        student = init_from_teacher(HybridEncoder(Config(n_layers=6, dropout=0.0)), range(6))
        ours = HybridEncoderRuntime(student, {"version": "test"}, precision=precision).encode(texts)
        np.testing.assert_allclose((ours * theirs).sum(1), 1.0, atol=tol)


def test_pruning_keeps_the_strongest_neurons():
    w_in = torch.zeros(6, 3)
    w_out = torch.zeros(3, 6)
    w_in[[1, 4]] = 5.0
    w_out[:, [1, 4]] = 1.0
    assert ffn_keep_indices(w_in, w_out, 2).tolist() == [1, 4]


def test_init_rejects_wrong_layer_count():
    with pytest.raises(ValueError):
        init_from_teacher(HybridEncoder(Config(n_layers=2)), [0], teacher=teacher_state_dict())


def test_losses():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert float(similarity_matrix_loss(x, x)) == 0.0
    # a perfect in-batch match at low temperature has near-zero contrastive loss
    assert float(info_nce(x, x, 0.01)) < 0.05
    assert float(info_nce(x, x.roll(1, 0), 0.01)) > 1.0


def test_distiller_loss_has_gradients_and_parts():
    torch.manual_seed(0)
    cfg = Config(vocab_size=100, d_model=32, n_heads=4, n_layers=1, d_ff=64, out_dim=16)
    student = HybridEncoder(cfg)
    ids = torch.randint(1, 100, (4, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    t = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    loss, parts = Distiller(student)(Batch(ids, mask, t, ids, mask, t, ids.flip(0), mask, t.flip(0)))
    loss.backward()
    assert set(parts) == {"loss", "cos", "sim", "nce"} and loss.item() > 0
    assert student.blocks[0].attn.qkv.weight.grad is not None
    # pairs without teacher embeddings still train through the contrastive term
    none = torch.zeros(4, dtype=torch.bool)
    zeros = torch.zeros(4, 16)
    loss2, parts2 = Distiller(student)(Batch(ids, mask, t, ids, mask, zeros, ids.flip(0), mask, zeros, none, none))
    assert torch.isfinite(loss2) and parts2["nce"] > 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, warmup=10, total=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_length_bucketed_batches_are_full_disjoint_and_even_in_length():
    lengths = [random.Random(i).randint(1, 100) for i in range(1000)]
    batches = length_bucketed(list(range(1000)), lengths, 16, random.Random(0), pool=10)
    flat = [i for b in batches for i in b]
    assert all(len(b) == 16 for b in batches) and len(flat) == len(set(flat))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 20  # random batches would spread ~90


def test_teacher_cache_is_content_addressed(tmp_path):
    """A second call with an overlapping sample only computes what is new, and returns the same vectors."""
    a = teacher_embeddings(["one fish", "two fish"], tmp_path, chunk=1, max_len=128)
    b = teacher_embeddings(["two fish", "red fish", "one fish"], tmp_path, chunk=1, max_len=128)
    shards = sorted((tmp_path / "teacher-store-128").glob("shard-*.npz"))
    assert len(shards) == 3  # one per distinct string
    np.testing.assert_allclose(b[0], a[1], atol=1e-6)
    np.testing.assert_allclose(b[2], a[0], atol=1e-6)
    assert b.shape == (3, 384) and b.dtype == np.float32
