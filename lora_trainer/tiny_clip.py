"""A tiny open_clip model that learns, offline and in seconds, to tell red squares from blue circles.

For tests and benchmarks of the captioner: the config is registered with ``open_clip.add_model_config``
(64 px images, 32-dim embeddings), the pictures are generated, and training is a contrastive loss of each
image against the phrases of both kinds. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

TINY_CLIP = "lora-trainer-tiny-clip"
KINDS = {"red square": "a red square", "blue circle": "a blue circle"}  # picture kind -> its phrase
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(folder: str | Path) -> Path:
    """Write the tiny config to ``folder/<TINY_CLIP>.json`` and register it; returns the file."""
    import open_clip

    path = Path(folder) / f"{TINY_CLIP}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CONFIG, indent=1), encoding="utf-8")
    open_clip.add_model_config(path)
    return path


def shape_image(kind: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A red square or a blue circle of random size and place, in a random shade, on a noisy light background."""
    back = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), back)
    draw = ImageDraw.Draw(img)
    side = rng.randint(size // 3, size * 3 // 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    if kind == "red square":
        draw.rectangle((x, y, x + side, y + side), fill=(rng.randint(170, 255), rng.randint(0, 60), rng.randint(0, 60)))
    elif kind == "blue circle":
        draw.ellipse((x, y, x + side, y + side), fill=(rng.randint(0, 60), rng.randint(0, 80), rng.randint(170, 255)))
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    return img


def train_tiny_clip(steps: int = 120, seed: int = 0, batch_size: int = 16):
    """(model, preprocess): the tiny model trained on generated pictures; needs ``register_tiny_clip`` first."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(list(KINDS.values()))
    model.token_embedding.requires_grad_(False)  # 1.6 M of the 1.8 M weights; the rest learns fast enough
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    kinds = list(KINDS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait for each other, and much longer on a busy machine
    try:
        model.train()
        for _ in range(steps):
            labels = torch.tensor([rng.randrange(len(kinds)) for _ in range(batch_size)])
            pixels = torch.stack([preprocess(shape_image(kinds[i], rng)) for i in labels.tolist()])
            image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), preprocess
