"""Which images go together in each batch of an epoch.

A batch holds images of one bucket only (the latents of a batch must share a shape). The order
depends on (seed, epoch) alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Size = tuple[int, int]  # (width, height) in pixels


def epoch_batches(buckets: Sequence[Size], repeats: Sequence[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """Batches of record indices for one epoch: record i appears repeats[i] times, each batch within one bucket."""
    groups = _group(buckets, repeats, batch_size)
    rng = random.Random(seed * 1_000_003 + epoch)  # private stream: never touches the global RNG
    batches = []
    for bucket in sorted(groups):  # sorted, so the stream does not depend on record order within buckets
        items = groups[bucket]
        rng.shuffle(items)
        batches += [items[i:i + batch_size] for i in range(0, len(items), batch_size)]  # last may be smaller
    rng.shuffle(batches)
    return batches


def batches_per_epoch(buckets: Sequence[Size], repeats: Sequence[int], batch_size: int) -> int:
    """len(epoch_batches(...)), without building or shuffling anything."""
    return sum(-(-len(items) // batch_size) for items in _group(buckets, repeats, batch_size).values())


def _group(buckets: Sequence[Size], repeats: Sequence[int], batch_size: int) -> dict[Size, list[int]]:
    if len(buckets) != len(repeats):
        raise ValueError(f"got {len(buckets)} buckets but {len(repeats)} repeat counts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[Size, list[int]] = {}
    for index, (bucket, count) in enumerate(zip(buckets, repeats)):
        if count < 0:
            raise ValueError(f"repeats[{index}] is negative ({count})")
        if count:
            groups.setdefault((int(bucket[0]), int(bucket[1])), []).extend([index] * count)
    return groups
