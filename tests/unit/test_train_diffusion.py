"""Pure pieces of the diffusion trainer: pair selection under an encode budget, the schedules, the layout fit."""

from __future__ import annotations

import math

import pytest
import torch

from hybridrag.models.text_diffusion import Config
from hybridrag.models.train_diffusion import fits, select_pairs, text_key
from hybridrag.models.training import cosine_lr, ema_update, schedule_progress


def test_select_pairs_takes_already_embedded_pairs_first_and_respects_the_budget():
    pairs = [("a", "b"), ("c", "d"), ("a", "e"), ("f", "g"), ("x" * 400, "b")]
    known = {text_key("a"), text_key("b")}
    assert select_pairs(pairs, known, encode_budget=0) == [("a", "b")]
    # one new text buys ("a", "e"); two more buy ("c", "d"); ("f", "g") would need two more
    assert select_pairs(pairs, known, encode_budget=3) == [("a", "b"), ("a", "e"), ("c", "d")]
    # no budget: every pair short enough
    assert select_pairs(pairs, known, encode_budget=None) == pairs[:4]


def test_schedule_progress_follows_the_clock_when_there_is_a_budget():
    assert schedule_progress(50, 100, elapsed_s=999, budget_s=None) == 0.5
    assert schedule_progress(10, 100, elapsed_s=30, budget_s=60) == 0.5
    assert schedule_progress(90, 100, elapsed_s=30, budget_s=60) == 0.9


def test_cosine_lr_warms_up_then_decays_to_a_tenth():
    assert cosine_lr(0, 0.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 0.0, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(50, 0.5, 1.0, warmup=10) == pytest.approx(0.55)
    assert cosine_lr(99, 1.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(99, 3.0, 1.0, warmup=10) == pytest.approx(0.1)


def test_ema_update_moves_toward_the_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, decay=0.75)
    torch.testing.assert_close(a.weight, 0.75 * before + 0.25 * b.weight.detach())
    ema_update(a, b, decay=0.0)
    torch.testing.assert_close(a.weight, b.weight)


def test_fits_leaves_room_for_specials():
    cfg = Config(query_len=4, doc_len=3)
    assert fits([1, 2], [1, 2], cfg)
    assert not fits([1, 2, 3], [1], cfg)  # [CLS] q [SEP] needs 5
    assert not fits([1], [1, 2, 3], cfg)  # the document's [SEP] needs a place
    assert math.isclose(len(text_key("x")), 20)
