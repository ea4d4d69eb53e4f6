"""Aspect-ratio buckets (as kohya's sd-scripts): train each image at a size close to its own shape.

Every bucket has about ``resolution**2`` pixels, so a batch costs the same whatever its shape,
and sides are multiples of ``step`` so the VAE's 8x downsampling stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """All maximal (w, h) with sides multiples of ``step`` in [min_reso, max_reso] and w*h <= resolution**2."""
    if step <= 0 or resolution <= 0:
        raise ConfigError(f"resolution ({resolution}) and bucket_reso_steps ({step}) must be positive")
    max_area = resolution * resolution
    max_side = max_reso // step * step
    buckets = set()
    if min_reso <= resolution <= max_reso:
        buckets.add((resolution, resolution))
    width = -(-min_reso // step) * step  # the smallest multiple of step >= min_reso
    while width <= max_side:
        # kohya's rule: for each width, the tallest height that keeps the area within budget.
        height = min(max_side, max_area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    if not buckets and resolution < min_reso:
        raise ConfigError(f"resolution {resolution} is below min_bucket_reso {min_reso}, so no bucket fits; set "
                          f"min_bucket_reso to at most {resolution} (or raise resolution)")
    if not buckets:
        raise ConfigError(f"no bucket fits: resolution {resolution} with sides between {min_reso} and {max_reso} "
                          f"in steps of {step}; lower min_bucket_reso or raise resolution")
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[Size], no_upscale: bool = False,
                  step: int = 64) -> Size:
    """The bucket closest in aspect ratio to a width x height image (ties: the larger bucket).

    With ``no_upscale``, an image that would have to be enlarged to cover its bucket gets a bucket
    of its own: its size (shrunk to the bucket's area if larger) rounded down to multiples of ``step``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)

    def key(bucket: Size) -> tuple:
        # log-ratio distance treats portrait and landscape alike; rounding makes exact ties compare equal.
        error = round(abs(math.log(bucket[0] / bucket[1]) - ratio), 9)
        return error, -bucket[0] * bucket[1], bucket[0]

    best = min((tuple(b) for b in buckets), key=key)
    if not no_upscale or (width >= best[0] and height >= best[1]):
        return best
    max_side = max(max(b) for b in buckets)
    scale = min(1.0, math.sqrt(best[0] * best[1] / (width * height)), max_side / width, max_side / height)
    # At least one step per side: a smaller bucket would be empty (such tiny images are upscaled a little).
    own_w = max(step, int(width * scale) // step * step)
    own_h = max(step, int(height * scale) // step * step)
    return own_w, own_h


def square_bucket(resolution: int) -> Size:
    """The single bucket used when bucketing is off: images are centre-cropped to a square."""
    return resolution, resolution
