"""Loss masks: which pixels of a training image count (white) and which do not (black).

A mask is an image's alpha channel or a grey image of the same name in a mask folder. It is cut exactly as its
image is (same cover-and-crop into the bucket, same mirror), then shrunk to the latents' size with area averaging,
as kohya does, so the loss of each latent pixel is weighted by the share of its 8x8 pixels that count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageOps

from .errors import DatasetError
from .images import cover_and_crop

logger = logging.getLogger("lora_trainer")

Size = Tuple[int, int]
MASK_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LATENT_SCALE = 8  # the VAE of SD1, SD2 and SDXL shrinks each side 8x


def find_mask_files(images: Sequence[Path], root: Path, mask_dir: str) -> Dict[Path, Optional[Path]]:
    """Each image's mask in ``mask_dir`` (same relative path and stem, any image extension), None where there is
    none; raises DatasetError if the folder does not exist."""
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"mask folder {folder} does not exist; check mask_dir")
    found: Dict[Path, Optional[Path]] = {}
    for image in images:
        relative = image.relative_to(root).with_suffix("")
        found[image] = next((folder / relative.with_suffix(ext) for ext in MASK_EXTENSIONS
                             if (folder / relative.with_suffix(ext)).is_file()), None)
    missing = [p.name for p, m in found.items() if m is None]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        logger.warning("%d image(s) have no mask in %s and train on every pixel: %s", len(missing), folder, shown)
    return found


def mask_tensor(source: Path, from_alpha: bool, image_size: Size, bucket: Size, flip: bool) -> torch.Tensor:
    """The mask at latent size, float32 (1, h/8, w/8) in [0, 1]. ``image_size`` is the upright image's (w, h): a mask
    of another size is first stretched to it, so it lines up with its image."""
    import numpy as np

    try:
        with Image.open(source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if from_alpha:
                if "A" not in img.getbands() and "transparency" not in img.info:
                    return torch.ones(1, bucket[1] // LATENT_SCALE, bucket[0] // LATENT_SCALE)
                grey = img.convert("RGBA").getchannel("A")
            else:
                grey = img.convert("L")
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; each means "unusable mask"
        raise DatasetError(f"{source}: cannot be read as a mask ({exc}); replace or remove it") from None
    if grey.size != tuple(image_size):
        grey = grey.resize(tuple(image_size), Image.Resampling.BILINEAR)
    (new_w, new_h), (left, top) = cover_and_crop(grey.size, bucket)
    grey = grey.resize((new_w, new_h), Image.Resampling.BILINEAR).crop((left, top, left + bucket[0],
                                                                       top + bucket[1]))
    if flip:
        grey = ImageOps.mirror(grey)
    values = torch.from_numpy(np.array(grey, dtype=np.float32) / 255.0)[None, None]
    latent = (bucket[1] // LATENT_SCALE, bucket[0] // LATENT_SCALE)
    return torch.nn.functional.interpolate(values, size=latent, mode="area")[0]


def stack_masks(masks: List[Optional[torch.Tensor]], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A (B, 1, h, w) batch of masks for latents ``like``; None when no item has one (then no masking at all); an item
    without a mask counts every pixel."""
    if all(m is None for m in masks):
        return None
    ones = torch.ones(1, *like.shape[-2:])
    return torch.stack([ones if m is None else m for m in masks]).to(like.device)
