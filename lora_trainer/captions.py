"""Turning a stored caption into the prompt of one training step (trigger word, prefix, shuffle, dropout).

Captions are comma-separated tags. All randomness comes from the ``rng`` passed in, so the same
seed gives the same prompts, and resuming a run replays them exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterable


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def build_caption(raw: str, *, trigger_word: str = "", prefix: str = "", shuffle: bool = False,
                  keep_tokens: int = 0, dropout_rate: float = 0.0, rng: random.Random, suffix: str = "") -> str:
    """The prompt for one step: trigger word, prefix tags, the caption's tags (maybe shuffled or dropped), then the
    suffix tags (kohya's caption_suffix; never shuffled)."""
    trigger = trigger_word.strip()
    tags = split_tags(raw)
    keep = max(0, keep_tokens)
    if trigger and tags and tags[0] == trigger:
        # The trigger already leads: it is placed first below and counts as one of the kept tags.
        tags, keep = tags[1:], max(0, keep - 1)
    # Exactly one draw for dropout on every call, taken first, so the stream never depends on the outcome.
    dropped = rng.random() < dropout_rate
    if shuffle and len(tags) - keep > 1:
        tail = tags[keep:]
        rng.shuffle(tail)
        tags = tags[:keep] + tail
    if dropped:
        return trigger
    return ", ".join(([trigger] if trigger else []) + split_tags(prefix) + tags + split_tags(suffix))


def tag_counts(captions: Iterable[str]) -> dict[str, int]:
    """How often each tag occurs over ``captions`` (kohya's ``ss_tag_frequency`` for one folder)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            counts[tag] = counts.get(tag, 0) + 1
    return counts
