"""Captioning speed: the real captioner (batched images, bank embeddings from the disk cache, model loaded once)
against a naive loop that captions one image at a time and re-encodes every phrase bank for each image.

Offline: the model is open_clip ViT-B-32 with random weights (the speed of real weights is the same), or the
tiny test model (``--model tiny``). Both paths use the same model object, banks and images.

    python benchmarks/caption_speed.py                      # ViT-B-32, 32 images batched, 2 naive
    python benchmarks/caption_speed.py --model tiny --images 64 --naive-images 8
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.caption import DEFAULT_THRESHOLD, Captioner, Choice, caption_folder  # noqa: E402
from lora_trainer.clip_models import load_clip  # noqa: E402
from lora_trainer.images import load_image  # noqa: E402
from lora_trainer.phrase_banks import load_banks  # noqa: E402
from lora_trainer.tiny_clip import KINDS, TINY_CLIP, register_tiny_clip, shape_image  # noqa: E402


def naive_caption(captioner: Captioner, path: Path, banks) -> str:
    """One image, every bank re-encoded: what a simple script calling CLIP per image does."""
    import torch

    model, tokenizer = captioner.clip.model, captioner.clip.tokenizer
    with torch.no_grad():
        image = torch.nn.functional.normalize(
            model.encode_image(captioner.clip.preprocess(load_image(path)).unsqueeze(0)), dim=-1)
        choices = []
        for bank in banks:
            text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(bank.phrases))), dim=-1)
            scores = (image @ text.T)[0].tolist()
            ranked = sorted(range(len(scores)), key=lambda j: -scores[j])[:bank.top]
            choices += [Choice(bank.name, bank.phrases[j], scores[j]) for j in ranked
                        if scores[j] >= DEFAULT_THRESHOLD]
    return captioner.compose(choices)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (random weights) or 'tiny'")
    parser.add_argument("--images", type=int, default=32, help="images for the batched captioner")
    parser.add_argument("--naive-images", type=int, default=2, help="images for the naive loop (it is slow)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name = args.model
        if name == "tiny":
            register_tiny_clip(root)
            name = TINY_CLIP
        t0 = time.perf_counter()
        clip = dataclasses.replace(load_clip(name, "none", "cpu"), model_id=f"benchmark-{name}-seed0")
        print(f"model {name} (random weights) loaded in {time.perf_counter() - t0:.1f} s; "
              f"{torch.get_num_threads()} torch threads")
        banks = load_banks()
        phrases = sum(len(b.phrases) for b in banks)

        data = root / "data"
        data.mkdir()
        rng = random.Random(0)
        for i in range(args.images):
            shape_image(list(KINDS)[i % 2], rng, size=256).save(data / f"img_{i:04d}.png")

        t0 = time.perf_counter()
        Captioner(clip, root / "cache").text_embeddings(banks[0])  # warm the disk cache for every bank
        for bank in banks[1:]:
            Captioner(clip, root / "cache").text_embeddings(bank)
        first_encode = time.perf_counter() - t0
        print(f"first run only: encoding {phrases} phrases of {len(banks)} banks took {first_encode:.1f} s")

        t0 = time.perf_counter()
        captioner = Captioner(clip, root / "cache")  # a new run: bank embeddings come from the disk cache
        run = caption_folder(data, captioner, banks=banks, batch_size=args.batch_size)
        batched_s = time.perf_counter() - t0
        batched_rate = len(run.captions) / batched_s

        paths = sorted(data.glob("*.png"))[:args.naive_images]
        t0 = time.perf_counter()
        for path in paths:
            naive_caption(captioner, path, banks)
        naive_s = time.perf_counter() - t0
        naive_rate = len(paths) / naive_s

    print(f"batched + cached : {len(run.captions)} images in {batched_s:.2f} s = {batched_rate:.2f} images/s "
          f"(batch {args.batch_size}, cache load, decode and save included)")
    print(f"naive per image  : {len(paths)} images in {naive_s:.2f} s = {naive_rate:.3f} images/s "
          f"(re-encodes {phrases} phrases per image)")
    print(f"speed-up: {batched_rate / naive_rate:.0f}x")


if __name__ == "__main__":
    main()
