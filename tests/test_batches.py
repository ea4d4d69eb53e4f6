import random
from collections import Counter

import pytest

from lora_trainer.batches import batches_per_epoch, epoch_batches

BUCKETS = [(512, 512)] * 5 + [(640, 384)] * 3 + [(384, 640)] * 2 + [(512, 512)]
REPEATS = [1, 2, 1, 1, 3, 10, 1, 1, 2, 0, 1]


def test_each_record_appears_repeats_times():
    batches = epoch_batches(BUCKETS, REPEATS, 4, seed=1, epoch=0)
    counts = Counter(i for batch in batches for i in batch)
    assert counts == Counter({i: r for i, r in enumerate(REPEATS) if r})
    assert 9 not in counts  # repeats 0: never seen


def test_batches_stay_within_one_bucket_and_keep_the_last_small_one():
    batch_size = 4
    batches = epoch_batches(BUCKETS, REPEATS, batch_size, seed=5, epoch=2)
    per_bucket = {}
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        shapes = {BUCKETS[i] for i in batch}
        assert len(shapes) == 1
        per_bucket.setdefault(shapes.pop(), []).append(len(batch))
    # 512x512: 1+2+1+1+3+1 = 9 items -> 4, 4, 1; 640x384: 12 -> 4, 4, 4; 384x640: 2 -> 2
    assert sorted(per_bucket[(512, 512)]) == [1, 4, 4]
    assert sorted(per_bucket[(640, 384)]) == [4, 4, 4]
    assert per_bucket[(384, 640)] == [2]


def test_deterministic_from_seed_and_epoch_only():
    a = epoch_batches(BUCKETS, REPEATS, 2, seed=3, epoch=1)
    assert a == epoch_batches(list(BUCKETS), tuple(REPEATS), 2, seed=3, epoch=1)
    assert a != epoch_batches(BUCKETS, REPEATS, 2, seed=3, epoch=2)
    assert a != epoch_batches(BUCKETS, REPEATS, 2, seed=4, epoch=1)
    # the documented stream: Random(seed * 1_000_003 + epoch)
    assert epoch_batches(BUCKETS, REPEATS, 2, seed=1, epoch=0) == \
        epoch_batches(BUCKETS, REPEATS, 2, seed=0, epoch=1_000_003)


def test_global_random_state_untouched():
    random.seed(123)
    state = random.getstate()
    epoch_batches(BUCKETS, REPEATS, 3, seed=9, epoch=0)
    assert random.getstate() == state


def test_order_is_shuffled_across_buckets():
    orders = {tuple(tuple(b) for b in epoch_batches(BUCKETS, REPEATS, 1, seed=0, epoch=e)) for e in range(5)}
    assert len(orders) == 5
    first_buckets = {BUCKETS[epoch_batches(BUCKETS, REPEATS, 4, seed=0, epoch=e)[0][0]] for e in range(30)}
    assert len(first_buckets) > 1  # batches are not grouped by bucket in the epoch's order


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 100])
def test_batches_per_epoch_matches(batch_size):
    for seed in range(3):
        expected = len(epoch_batches(BUCKETS, REPEATS, batch_size, seed=seed, epoch=seed))
        assert batches_per_epoch(BUCKETS, REPEATS, batch_size) == expected
    if batch_size == 1:
        assert batches_per_epoch(BUCKETS, REPEATS, 1) == sum(REPEATS)


def test_empty_and_bad_input():
    assert epoch_batches([], [], 2, seed=0, epoch=0) == []
    assert batches_per_epoch([], [], 2) == 0
    with pytest.raises(ValueError):
        epoch_batches(BUCKETS, REPEATS[:-1], 2, seed=0, epoch=0)
    with pytest.raises(ValueError):
        batches_per_epoch(BUCKETS, REPEATS, 0)
    with pytest.raises(ValueError):
        epoch_batches([(64, 64)], [-1], 1, seed=0, epoch=0)
