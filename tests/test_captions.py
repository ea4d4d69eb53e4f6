import random

import pytest

from lora_trainer.captions import build_caption, split_tags, tag_counts


def caption(raw, seed=0, **kwargs):
    return build_caption(raw, rng=random.Random(seed), **kwargs)


def test_tags_are_stripped_and_empty_ones_dropped():
    assert split_tags(" a , ,b ,c,, ") == ["a", "b", "c"]
    assert caption(" a , ,b ,c,, ") == "a, b, c"
    assert caption("") == ""


def test_trigger_word_goes_first_once():
    assert caption("a, b", trigger_word="sks") == "sks, a, b"
    assert caption("sks, a, b", trigger_word="sks") == "sks, a, b"
    assert caption(" sks ,a", trigger_word=" sks ") == "sks, a"
    assert caption("", trigger_word="sks") == "sks"


def test_prefix_follows_trigger_word():
    assert caption("a, b", trigger_word="sks", prefix="masterpiece, best quality") == \
        "sks, masterpiece, best quality, a, b"
    assert caption("a", prefix="photo") == "photo, a"


def test_shuffle_keeps_first_tokens_and_all_tags():
    raw = "first, second, t1, t2, t3, t4, t5, t6"
    orders = set()
    for seed in range(20):
        out = caption(raw, seed, trigger_word="sks", prefix="p", shuffle=True, keep_tokens=2).split(", ")
        assert out[:4] == ["sks", "p", "first", "second"]
        assert sorted(out[4:]) == ["t1", "t2", "t3", "t4", "t5", "t6"]
        orders.add(tuple(out[4:]))
    assert len(orders) > 5  # really shuffled


def test_trigger_in_caption_counts_as_a_kept_token():
    for seed in range(10):
        out = caption("sks, a, b, c, d", seed, trigger_word="sks", shuffle=True, keep_tokens=2).split(", ")
        assert out[:2] == ["sks", "a"]
        assert sorted(out[2:]) == ["b", "c", "d"]
        out = caption("sks, a, b, c, d", seed, trigger_word="sks", shuffle=True, keep_tokens=0).split(", ")
        assert out[0] == "sks" and out.count("sks") == 1


def test_keep_tokens_without_shuffle_changes_nothing():
    assert caption("c, b, a", keep_tokens=1) == "c, b, a"


def test_same_rng_state_same_caption():
    kwargs = dict(trigger_word="sks", shuffle=True, keep_tokens=1, dropout_rate=0.3)
    raw = "a, b, c, d, e, f, g"
    runs = []
    for _ in range(2):
        rng = random.Random(7)
        runs.append([build_caption(raw, rng=rng, **kwargs) for _ in range(50)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 10 and "sks" in runs[0]  # the 50 calls differ: shuffles and some dropouts


def test_dropout_replaces_the_caption():
    assert caption("a, b", trigger_word="sks", prefix="p", dropout_rate=1.0) == "sks"
    assert caption("a, b", prefix="p", dropout_rate=1.0) == ""
    assert caption("a, b", trigger_word="sks", dropout_rate=0.0) == "sks, a, b"


def test_dropout_rate_is_respected():
    rng = random.Random(0)
    dropped = sum(build_caption("a, b", trigger_word="t", dropout_rate=0.3, rng=rng) == "t" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_exactly_one_draw_without_shuffle(rate):
    rng = random.Random(3)
    build_caption("a, b, c", trigger_word="t", dropout_rate=rate, rng=rng)
    reference = random.Random(3)
    reference.random()
    assert rng.getstate() == reference.getstate()


def test_rng_stream_does_not_depend_on_dropout_outcome():
    states = []
    for rate in (0.0, 1.0):
        rng = random.Random(11)
        build_caption("a, b, c, d", shuffle=True, dropout_rate=rate, rng=rng)
        states.append(rng.getstate())
    assert states[0] == states[1]


def test_tag_counts():
    assert tag_counts(["a, b", "b, c ,", "", " a"]) == {"a": 2, "b": 2, "c": 1}
    assert tag_counts([]) == {}
