"""Captions from CLIP zero-shot ranking, the way clip-interrogator and A1111's interrogator build them.

Each image is scored (cosine similarity) against every phrase of every bank. From each bank the caption
takes its best phrases, at most the bank's ``top``, each scoring at least ``threshold``. Phrases go in bank
order (the user's candidates, subject, medium, style, setting, lighting, ...), best first within a bank;
a phrase equal to or contained in one already taken is dropped, and phrases stop fitting at CLIP's 77-token
limit (75 plus start and end). Scores are rounded before ranking, so the same images, banks and weights give
the same captions whatever the batch size. The model loads once per ``Captioner``; images are encoded in
batches while the next batch is decoded; bank embeddings come from the disk cache (``text_cache``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .caption_editing import METADATA, CaptionEntry, CaptionSet, SaveResult, load_captions
from .captions import split_tags
from .clip_models import ClipModel, load_clip
from .errors import DatasetError, UserError
from .images import load_image
from .phrase_banks import PhraseBank, load_banks, read_candidates, sort_banks
from .text_cache import TextEmbeddingCache

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lora_trainer")

DEFAULT_THRESHOLD = 0.2  # cosine similarity; suits OpenAI/LAION CLIP ViT-B and ViT-L
MAX_TOKENS = 75  # CLIP's context of 77 minus the start and end tokens
MODES = ("skip", "append", "overwrite")
_TEXT_CHUNK = 256


class CaptionError(UserError):
    """Captioning options that cannot work."""


@dataclass(frozen=True)
class Choice:
    bank: str
    phrase: str
    score: float  # cosine similarity, rounded to 4 decimals


class Captioner:
    """One loaded CLIP model with its tokenizer and bank embeddings; reuse it for many images."""

    def __init__(self, clip: ClipModel, cache_dir: str | Path | None = None) -> None:
        import open_clip

        self.clip = clip
        variant = "fp16-autocast" if self.clip.device.startswith("cuda") else "fp32"
        self.cache = TextEmbeddingCache(clip.model_id, variant, cache_dir)
        self._bpe = open_clip.SimpleTokenizer()  # the tokenizer of SD's text encoders too: counts the 77 tokens
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def load(cls, model_name: str = "ViT-L-14", pretrained: str = "openai", device: str | None = None,
             cache_dir: str | Path | None = None) -> Captioner:
        return cls(load_clip(model_name, pretrained, device), cache_dir)

    # -- embeddings ------------------------------------------------------------------------------

    def text_embeddings(self, bank: PhraseBank) -> torch.Tensor:
        """Unit-length embeddings of the bank's phrases [n, d]: memory, then disk cache, then the text encoder."""
        import torch

        key = (bank.name, bank.digest)
        if key not in self._embeddings:
            cached = self.cache.load(bank)
            if cached is None:
                logger.info("encoding phrase bank %r (%d phrases, once per model)", bank.name, len(bank.phrases))
                encoded = torch.cat([self._encode_texts(list(bank.phrases[i:i + _TEXT_CHUNK]))
                                     for i in range(0, len(bank.phrases), _TEXT_CHUNK)])
                self.cache.save(bank, encoded.numpy())
            else:
                encoded = torch.from_numpy(cached)
            self._embeddings[key] = encoded
        return self._embeddings[key]

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings [n, d] of preprocessed images [n, 3, H, W]."""
        import torch

        with torch.no_grad(), self._autocast():
            features = self.clip.model.encode_image(pixels.to(self.clip.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def preprocess(self, path: Path) -> torch.Tensor:
        """Decode one image (EXIF, transparency, 16-bit: as training does) into the model's input tensor."""
        return self.clip.preprocess(load_image(path))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        tokens = self.clip.tokenizer(texts)
        with torch.no_grad(), self._autocast():
            features = self.clip.model.encode_text(tokens.to(self.clip.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def _autocast(self):
        import torch

        if self.clip.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # -- captions --------------------------------------------------------------------------------

    def rank(self, image_features: torch.Tensor, banks: list[PhraseBank],
             threshold: float = DEFAULT_THRESHOLD) -> list[list[Choice]]:
        """Per image, the chosen phrases in caption order: per bank its ``top`` best scoring >= ``threshold``."""
        chosen: list[list[Choice]] = [[] for _ in range(image_features.shape[0])]
        for bank in sort_banks(list(banks)):
            scores = (image_features @ self.text_embeddings(bank).T).tolist()
            for i, row in enumerate(scores):
                ranked = sorted(((round(s, 4), j) for j, s in enumerate(row)), key=lambda x: (-x[0], x[1]))
                chosen[i] += [Choice(bank.name, bank.phrases[j], s) for s, j in ranked[:bank.top] if s >= threshold]
        return chosen

    def compose(self, choices: list[Choice], trigger: str = "", existing: str = "",
                max_tokens: int = MAX_TOKENS) -> str:
        """Trigger word, then the existing tags (kept whole), then the chosen phrases that fit in ``max_tokens``."""
        parts: list[str] = []
        seen: list[str] = []
        for text in ([trigger] if trigger.strip() else []) + split_tags(existing):
            norm = _norm(text)
            if norm not in seen:
                parts.append(text.strip())
                seen.append(norm)
        for choice in choices:
            norm = _norm(choice.phrase)
            if any(norm == s or f" {norm} " in f" {s} " for s in seen):
                continue  # "red" adds nothing after "a red square"
            if self.count_tokens(", ".join(parts + [choice.phrase])) <= max_tokens:
                parts.append(choice.phrase)
                seen.append(norm)
        return ", ".join(parts)

    def count_tokens(self, text: str) -> int:
        return len(self._bpe.encode(text))

    def caption_images(self, pixels: torch.Tensor, banks: list[PhraseBank], threshold: float = DEFAULT_THRESHOLD,
                       trigger: str = "", max_tokens: int = MAX_TOKENS) -> list[str]:
        features = self.image_embeddings(pixels)
        return [self.compose(c, trigger, max_tokens=max_tokens) for c in self.rank(features, banks, threshold)]


@dataclass
class CaptionRun:
    root: Path
    captions: dict[str, str]  # image name -> its caption now, for the images captioned in this run
    kept: list[str]  # images left as they were (they had a caption and the mode was "skip")
    unreadable: list[tuple[Path, str]]  # (image, reason): listed, skipped, their captions untouched
    saved: SaveResult
    seconds: float  # captioning time, model loading excluded
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return len(self.captions) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the console: counts, speed, files written, backup."""
        parts = [f"captioned {len(self.captions)} image(s) in {self.seconds:.1f} s "
                 f"({self.images_per_second:.1f} images/s)"]
        if self.stopped:
            parts.append("stopped early")
        if self.kept:
            parts.append(f"{len(self.kept)} kept their caption")
        if self.unreadable:
            names = ", ".join(p.name for p, _ in self.unreadable[:10])
            more = f" and {len(self.unreadable) - 10} more" if len(self.unreadable) > 10 else ""
            parts.append(f"{len(self.unreadable)} unreadable, skipped: {names}{more}")
        written = self.saved.written
        if not written:
            parts.append("no caption file changed")
        elif len(written) <= 3:
            parts.append("wrote " + ", ".join(p.relative_to(self.root).as_posix() for p in written))
        else:
            parts.append(f"wrote {len(written)} caption files")
        if self.saved.backup_dir:
            parts.append(f"previous versions in {self.saved.backup_dir}")
        return "; ".join(parts)


def caption_folder(dataset: str | Path | CaptionSet, captioner: Captioner, *, banks: list[PhraseBank] | None = None,
                   candidates: str | Path | None = None, mode: str = "skip", fmt: str = "auto", trigger: str = "",
                   threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16, max_tokens: int = MAX_TOKENS,
                   show_progress: bool = False, on_progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> CaptionRun:
    """Caption the images of a dataset folder and save the captions (metadata.csv and/or .txt, see ``fmt``).

    ``dataset``: the folder, or its ``CaptionSet`` as the caption editor holds it (then ``fmt`` is the set's,
    and its unsaved edits are saved too).

    ``banks``: the phrase banks (default: all bundled ones); ``candidates``: a file of the user's own phrases.
    ``mode``: "skip" leaves captioned images alone, "append" adds new phrases to their captions, "overwrite"
    replaces them. ``on_progress(done, total)`` follows the images; ``should_stop()`` ends early, saving what
    is done.
    """
    _check_options(mode, threshold, batch_size, max_tokens)
    banks = list(load_banks() if banks is None else banks)
    if candidates:
        banks.append(read_candidates(candidates))
    if not banks:
        raise CaptionError("no phrase banks and no --candidates: nothing to caption with")
    captions = dataset if isinstance(dataset, CaptionSet) else load_captions(dataset, fmt)
    warnings = _format_warnings(captions.root, captions.format)
    entries = captions.images()
    todo = [e for e in entries if mode != "skip" or not e.caption]
    kept = [e.name for e in entries if mode == "skip" and e.caption]
    if kept:
        logger.info("%d image(s) already have a caption and are kept (--mode append or overwrite changes them)",
                    len(kept))
    for bank in sort_banks(banks) if todo else []:  # encode (or load) the banks before the clock and the bar
        captioner.text_embeddings(bank)

    start, done, stopped = time.perf_counter(), {}, False
    unreadable: list[tuple[Path, str]] = []
    with _progress_bar(len(todo), show_progress) as bar:
        for batch in _load_batches(captioner, todo, batch_size):
            good = [(entry, pixels) for entry, pixels, _ in batch if pixels is not None]
            unreadable += [(entry.path, error) for entry, pixels, error in batch if pixels is None]
            if good:
                features = captioner.image_embeddings(_stack([pixels for _, pixels in good]))
                for (entry, _), choices in zip(good, captioner.rank(features, banks, threshold)):
                    existing = entry.caption if mode == "append" else ""
                    done[entry.name] = captioner.compose(choices, trigger, existing, max_tokens)
                    captions.set_caption(entry.name, done[entry.name])
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(len(done) + len(unreadable), len(todo))
            if should_stop is not None and should_stop():
                stopped = True
                break
    seconds = time.perf_counter() - start
    if unreadable:
        logger.warning("skipped %d unreadable image(s): %s", len(unreadable),
                       "; ".join(reason for _, reason in unreadable[:20]))
    saved = captions.save()
    return CaptionRun(captions.root, done, kept, unreadable, saved, seconds, stopped, warnings)


def caption_dataset(dataset_dir: str | Path, *, model_name: str = "ViT-L-14", pretrained: str = "openai",
                    device: str | None = None, bank_names: list[str] | None = None,
                    bank_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                    candidates: str | Path | None = None, mode: str = "skip", fmt: str = "auto", trigger: str = "",
                    threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16, max_tokens: int = MAX_TOKENS,
                    show_progress: bool = False, on_progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> CaptionRun:
    """Load the banks and the model (once), then ``caption_folder``: the one call the CLI makes.

    ``bank_names``: bundled banks to use (None: all; []: none); ``bank_dir``: extra or replacement bank files.
    The folder, banks and options are checked before the model loads, so a typo costs no download.
    """
    _check_options(mode, threshold, batch_size, max_tokens)
    banks = load_banks(bank_names, bank_dir) + ([read_candidates(candidates)] if candidates else [])
    if not banks:
        raise CaptionError("no phrase banks and no --candidates: nothing to caption with")
    captions = load_captions(dataset_dir, fmt)
    captioner = Captioner.load(model_name, pretrained, device, cache_dir)
    return caption_folder(captions, captioner, banks=banks, mode=mode, trigger=trigger, threshold=threshold,
                          batch_size=batch_size, max_tokens=max_tokens, show_progress=show_progress,
                          on_progress=on_progress, should_stop=should_stop)


def _check_options(mode: str, threshold: float, batch_size: int, max_tokens: int) -> None:
    if mode not in MODES:
        raise CaptionError(f"caption mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if not -1.0 <= threshold <= 1.0:
        raise CaptionError(f"threshold {threshold} is not a cosine similarity; use a value between -1 and 1 "
                           f"(default {DEFAULT_THRESHOLD})")
    if batch_size < 1:
        raise CaptionError(f"batch size must be at least 1, got {batch_size}")
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise CaptionError(f"max tokens must be between 1 and {MAX_TOKENS}, got {max_tokens}")


def _format_warnings(root: Path, fmt: str) -> list[str]:
    if fmt == "txt" and (root / METADATA).is_file():
        message = (f"{root / METADATA} exists and training reads it instead of .txt files; use --format both "
                   "or csv, or move it away")
        logger.warning("%s", message)
        return [message]
    return []


def _load_batches(captioner: Captioner, entries: list[CaptionEntry], batch_size: int
                  ) -> Iterator[list[tuple[CaptionEntry, torch.Tensor | None, str]]]:
    """Batches of (entry, pixels or None, error); the next batch decodes in threads while this one is encoded."""
    def load(entry: CaptionEntry) -> tuple[CaptionEntry, torch.Tensor | None, str]:
        try:
            return entry, captioner.preprocess(entry.path), ""
        except DatasetError as exc:
            return entry, None, str(exc)

    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora_trainer-caption") as pool:
        pending = None
        for start in range(0, len(entries), batch_size):
            futures = [pool.submit(load, e) for e in entries[start:start + batch_size]]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = futures
        if pending is not None:
            yield [f.result() for f in pending]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.stack(tensors)


@contextlib.contextmanager
def _progress_bar(total: int, show: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="captioning", dynamic_ncols=True, mininterval=0.5, disable=not show)
    try:
        yield bar
    finally:
        bar.close()


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())
