"""A CLIP tokenizer folder built offline from the BPE table that open_clip ships.

SD1's tokenizer (openai/clip-vit-large-patch14) is the original OpenAI CLIP BPE. open_clip bundles the very
same table (``bpe_simple_vocab_16e6.txt.gz``), so we can write ``vocab.json`` and ``merges.txt`` from it
and never touch the model hub. ``CLIPTokenizer.from_pretrained(clip_tokenizer_dir())`` then gives the same
ids as the hub tokenizer and as ``open_clip.tokenize``.

The OpenCLIP text encoders (SD2's ViT-H, SDXL's second encoder bigG) use the same vocabulary but pad with
"!" (id 0), as ``open_clip.tokenize`` does: ``clip_tokenizer_dir(OPEN_CLIP_PAD)``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

from ..errors import ModelError

log = logging.getLogger("lora_trainer")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
OPEN_CLIP_PAD = "!"  # token 0: what open_clip pads with (SD2, SDXL's second text encoder)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_N_MERGES = 49152 - 256 - 2  # as in OpenAI's CLIP: 48894 merges, 49408 tokens in all


def cache_root() -> Path:
    """``$LORA_TRAINER_CACHE`` or ``~/.cache/lora_trainer``: generated, re-creatable files only."""
    env = os.environ.get("LORA_TRAINER_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora_trainer"


def build_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder ``target`` by ``fill(temporary folder)`` and one rename, so nobody sees half of it.

    If another process wins the race, its folder is kept and ours is thrown away.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def open_clip_bpe_path() -> Path:
    """The BPE table bundled with open_clip, found without importing open_clip (which imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("open_clip is not installed — the CLIP tokenizer is built from its BPE table; "
                         "run `pip install open_clip_torch` (or put a tokenizer/ folder in the model config)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed open_clip — reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> Dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _merges(bpe_path: Path) -> List[str]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[1:_N_MERGES + 1]  # line 0 is a version header, as in open_clip's SimpleTokenizer


def write_clip_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """Write the four tokenizer files of openai/clip-vit-large-patch14 (pad ``<|endoftext|>``) into ``folder``;
    with ``pad_token="!"`` those of SD2 / SDXL's ``tokenizer_2`` (OpenCLIP)."""
    merges = _merges(open_clip_bpe_path())
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ModelError(f"{open_clip_bpe_path()}: gives {len(vocab)} tokens, expected 49408 — "
                         "reinstall open_clip_torch")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers skips the first line of merges.txt (a version header) like open_clip does.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")


def has_tokenizer(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES) or (folder / "tokenizer.json").is_file()


def clip_tokenizer_dir(pad_token: str = EOS) -> Path:
    """A folder ``CLIPTokenizer.from_pretrained`` loads offline; created once in the cache."""
    if pad_token not in (EOS, OPEN_CLIP_PAD):
        raise ValueError(f"pad token {pad_token!r}: use {EOS!r} (CLIP) or {OPEN_CLIP_PAD!r} (OpenCLIP)")
    target = cache_root() / ("clip_tokenizer" if pad_token == EOS else "open_clip_tokenizer")
    if target.is_dir() and all((target / name).is_file() for name in TOKENIZER_FILES):
        return target
    if target.is_dir():  # incomplete (should not happen: we rename complete folders only); rebuild it
        log.warning("rebuilding incomplete tokenizer folder %s", target)
        shutil.rmtree(target, ignore_errors=True)
    log.info("writing the CLIP tokenizer files to %s", target)
    return build_atomically(target, lambda folder: write_clip_tokenizer(folder, pad_token))
