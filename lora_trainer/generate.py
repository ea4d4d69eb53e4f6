"""``python -m lora_trainer generate``: render a prompt with ``<lora:name:w>`` tags, as the WebUI would.

Names are looked up in a LoRA folder (file stem or ``ss_output_name``), every file is checked against the base
model's family, each becomes one network attached with its weights (any number blend), and the PNG carries
A1111-style infotext in its ``parameters`` text chunk, so the WebUI's "PNG Info" reads it back.

Standalone only: the base model is loaded with diffusers (``backbones.single_file``).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import __version__
from .errors import ConfigError
from .files import write_bytes_atomic
from .hashing import addnet_hash_file
from .lora_stack import LoraFile, LoraLibrary, attached_stack, load_stack
from .prompt_syntax import LoraTag, format_infotext, lora_hashes_value, parse_prompt

logger = logging.getLogger("lora_trainer")

SAMPLER = "DDIM"  # what DiffusersSDBackbone.generate runs


@dataclass
class ChosenLora:
    tag: LoraTag
    file: LoraFile

    @property
    def short_hash(self) -> str:
        """The first 12 hex of the addnet hash (``sshs_model_hash`` when the file has it), as A1111 shows it."""
        stored = str(self.file.metadata.get("sshs_model_hash", "")).strip().lower()
        return (stored if re.fullmatch(r"[0-9a-f]{64}", stored) else addnet_hash_file(self.file.path))[:12]


@dataclass
class Generated:
    path: Path
    infotext: str
    loras: List[ChosenLora]


def parse_size(text: str) -> Tuple[int, int]:
    """``512x512`` (width x height) -> (512, 512); one ConfigError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise ConfigError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


def choose_loras(tags: Sequence[LoraTag], lora_dir: Path) -> List[ChosenLora]:
    """Find and read the file of every tag (before the base model loads, so a typo fails fast)."""
    if not tags:
        return []
    library = LoraLibrary.scan(Path(lora_dir))
    chosen = []
    for tag in tags:
        if tag.dyn is not None:
            logger.warning("<lora:%s>: dyn=%d is ignored (DyLoRA rank selection is not supported)", tag.name, tag.dyn)
        chosen.append(ChosenLora(tag, LoraFile.read(library.resolve(tag.name))))
    return chosen


def render(backbone, prompt: str, loras: Sequence[ChosenLora], negative_prompt: str, seed: int, steps: int,
           cfg_scale: float, size: Tuple[int, int]):
    """One image of ``prompt`` (tags already removed) with every LoRA attached at its weights."""
    for lora in loras:
        lora.file.check_family(backbone.family)
    targets = backbone.lora_targets(conv=True, text_encoder=True)
    entries = load_stack(targets, [(c.file, c.tag.te_weight, c.tag.unet_weight) for c in loras], backbone.device)
    with attached_stack(entries):
        return backbone.generate([prompt], negative_prompt, seed, steps, cfg_scale, size)[0]


def infotext_for(prompt: str, negative_prompt: str, loras: Sequence[ChosenLora], steps: int, cfg_scale: float,
                 seed: int, size: Tuple[int, int], model_name: str, model_hash: Optional[str],
                 clip_skip: int = 1) -> str:
    params = {
        "Steps": steps, "Sampler": SAMPLER, "CFG scale": float(cfg_scale), "Seed": seed,
        "Size": f"{size[0]}x{size[1]}", "Model hash": model_hash, "Model": model_name,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Lora hashes": lora_hashes_value([(c.tag.name, c.short_hash) for c in loras]),
        "Version": f"lora_trainer {__version__}",
    }
    return format_infotext(prompt, negative_prompt, params)


def save_png(image, path: Path, infotext: str) -> Path:
    """The image with ``parameters`` = infotext (A1111's PNG Info field), written atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return write_bytes_atomic(Path(path), buffer.getvalue())


def default_output(seed: int, folder: Path = Path(".")) -> Path:
    """``generated-<seed>.png`` in ``folder``, or ``-2``, ``-3``, ... : never overwrites."""
    for n in range(1, 100_000):
        path = Path(folder) / (f"generated-{seed}.png" if n == 1 else f"generated-{seed}-{n}.png")
        if not path.exists():
            return path
    raise ConfigError(f"{folder}: too many generated-{seed}*.png files; pass --out")


def generate_to_png(base: str, prompt: str, negative_prompt: str = "", seed: int = 1, steps: int = 20,
                    size: Tuple[int, int] = (512, 512), lora_dir: Path = Path("models/Lora"),
                    out: Optional[Path] = None, model_config: str = "", cfg_scale: float = 7.0,
                    clip_skip: int = 1, device: str = "auto") -> Generated:
    """Load ``base``, render ``prompt`` with its LoRA tags, write the PNG with infotext; return where."""
    import torch

    from .backbones.single_file import load_backbone_from_path
    from .devices import resolve_device

    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be 1 or more")
    clean, tags = parse_prompt(prompt)
    loras = choose_loras(tags, lora_dir)
    target = resolve_device(device)
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    backbone = load_backbone_from_path(base, model_config, clip_skip=clip_skip, device=target, dtype=dtype)
    image = render(backbone, clean, loras, negative_prompt, seed, steps, cfg_scale, size)
    infotext = infotext_for(prompt, negative_prompt, loras, steps, cfg_scale, seed, size, backbone.model_name,
                            backbone.model_hash, clip_skip)
    path = save_png(image, Path(out) if out else default_output(seed), infotext)
    logger.info("saved %s", path)
    return Generated(path, infotext, list(loras))
