"""Length-bucketed batches: the texts of one encoder call, grouped so that little of each batch is padding.

A transformer batch costs about (texts × the longest text's tokens): every text is
padded to the longest. Queries vary a lot in length (a 4-word question beside a
40-word definition), so one batch of 64 can be two-thirds padding. Sorting by
length and cutting wherever padding would pass ``max_padding`` of the batch keeps
the work near the real tokens, at the price of a few more (cheap) model calls.
"""

from __future__ import annotations

from typing import Sequence


def length_buckets(lengths: Sequence[int], max_batch: int, max_padding: float = 0.25,
                   min_batch: int = 8) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, each sorted by length, in ascending length order.

    A batch closes at ``max_batch`` items, or before an item whose length would make
    padding more than ``max_padding`` of the batch's padded size; a batch of fewer than
    ``min_batch`` items always takes the next one (a model call has a fixed cost too).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not 0.0 <= max_padding < 1.0:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if batch:
            padded = (len(batch) + 1) * n  # sorted ascending: the new item is the longest
            full = len(batch) >= max_batch
            wasteful = len(batch) >= min_batch and (padded - real - n) > max_padding * padded
            if full or wasteful:
                out.append(batch)
                batch, real = [], 0
        batch.append(i)
        real += n
    if batch:
        out.append(batch)
    return out
