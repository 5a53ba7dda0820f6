"""Length buckets: every text in exactly one batch, batches capped, padding bounded once a batch is big enough."""

import random

import pytest

from hybridrag.models.batching import length_buckets


def padding_share(lengths, batch):
    longest = max(lengths[i] for i in batch)
    return 1 - sum(lengths[i] for i in batch) / (longest * len(batch))


def test_every_index_once_batches_capped_and_padding_bounded():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(3, 12), rng.randint(30, 70)]) for _ in range(200)]
    batches = length_buckets(lengths, max_batch=64, max_padding=0.25, min_batch=8)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) <= 64 for b in batches)
    assert all(padding_share(lengths, b) <= 0.25 for b in batches if len(b) > 8)
    # mixed lengths in one batch of 64 would be mostly padding
    assert padding_share(lengths, list(range(64))) > 0.5


def test_equal_lengths_fill_whole_batches_and_small_inputs_stay_whole():
    assert [len(b) for b in length_buckets([10] * 100, 64)] == [64, 36]
    assert length_buckets([3, 50], 64) == [[0, 1]]  # under min_batch: one call
    assert length_buckets([], 64) == []


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_batch": 4, "max_padding": 1.0}])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        length_buckets([1, 2], **kw)
