"""A small loss chart drawn with Pillow (already a dependency everywhere we run; no matplotlib)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def smooth(values: Sequence[float], window: int = 20) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(steps: Sequence[int], losses: Sequence[float], title: str = "loss",
               size: tuple = (640, 360), validation: Sequence[tuple] = ()) -> Image.Image:
    """Raw loss in light grey, a moving average in blue, the validation loss ((step, loss) pairs) in orange with a
    dot per measurement, with min/max labels on the axes."""
    width, height = size
    left, right, top, bottom = 60, 16, 28, 32
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="#999999")
    if len(steps) < 2:
        draw.text((left + 10, top + 10), "not enough steps yet", fill="#666666")
        return img
    lo, hi = min(list(losses) + [v for _, v in validation]), max(list(losses) + [v for _, v in validation])
    hi = hi if hi > lo else lo + 1e-6
    x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def point(step: float, loss: float) -> tuple:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (loss - lo) / (hi - lo) * (height - top - bottom)
        return (x, y)

    draw.line([point(s, v) for s, v in zip(steps, losses)], fill="#c8c8c8", width=1)
    draw.line([point(s, v) for s, v in zip(steps, smooth(list(losses)))], fill="#1f5fbf", width=2)
    if validation:
        points = [point(s, v) for s, v in validation]
        if len(points) > 1:
            draw.line(points, fill="#e07b00", width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#e07b00")
        draw.text((width - right - 120, 8), "validation (orange)", fill="#e07b00")
    draw.text((4, top - 4), f"{hi:.4f}", fill="black")
    draw.text((4, height - bottom - 8), f"{lo:.4f}", fill="black")
    draw.text((left, height - bottom + 6), str(steps[0]), fill="black")
    draw.text((width - right - 40, height - bottom + 6), f"step {steps[-1]}", fill="black")
    return img
