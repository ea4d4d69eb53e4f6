"""Which images go together in each batch of an epoch.

A batch holds images of one bucket only (the latents of a batch must share a shape). The order
depends on (seed, epoch) alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional, Union

Size = tuple[int, int]  # (width, height) in pixels


BatchSize = Union[int, Sequence[int]]  # one size, or one per dataset group


def epoch_batches(buckets: Sequence[Size], repeats: Sequence[int], batch_size: BatchSize, seed: int,
                  epoch: int, groups: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Batches of record indices for one epoch: record i appears repeats[i] times, each batch within one bucket of one
    dataset group (``groups[i]``, kohya's [[datasets]], each with its own batch size)."""
    pools = _group(buckets, repeats, batch_size, groups)
    rng = random.Random(seed * 1_000_003 + epoch)  # private stream: never touches the global RNG
    batches = []
    for key in sorted(pools):  # sorted, so the stream does not depend on record order within buckets
        items, size = pools[key], _size_of(batch_size, key[0])
        rng.shuffle(items)
        batches += [items[i:i + size] for i in range(0, len(items), size)]  # last may be smaller
    rng.shuffle(batches)
    return batches


def batches_per_epoch(buckets: Sequence[Size], repeats: Sequence[int], batch_size: BatchSize,
                      groups: Optional[Sequence[int]] = None) -> int:
    """len(epoch_batches(...)), without building or shuffling anything."""
    return sum(-(-len(items) // _size_of(batch_size, key[0]))
               for key, items in _group(buckets, repeats, batch_size, groups).items())


def _size_of(batch_size: BatchSize, group: int) -> int:
    return batch_size if isinstance(batch_size, int) else batch_size[group]


def _group(buckets: Sequence[Size], repeats: Sequence[int], batch_size: BatchSize,
           groups: Optional[Sequence[int]]) -> dict[tuple[int, int, int], list[int]]:
    if len(buckets) != len(repeats):
        raise ValueError(f"got {len(buckets)} buckets but {len(repeats)} repeat counts")
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    if min(sizes) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pools: dict[tuple[int, int, int], list[int]] = {}
    for index, (bucket, count) in enumerate(zip(buckets, repeats)):
        if count < 0:
            raise ValueError(f"repeats[{index}] is negative ({count})")
        if count:
            group = groups[index] if groups is not None else 0
            pools.setdefault((group, int(bucket[0]), int(bucket[1])), []).extend([index] * count)
    return pools
