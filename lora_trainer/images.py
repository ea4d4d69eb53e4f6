"""Reading training images: any file PIL opens becomes an upright RGB image, or one clear DatasetError.

Every image goes through ``load_image`` so the rules (EXIF orientation, transparency over white,
16-bit scaling) are the same when caching latents and when previewing. ``image_size`` is the cheap
header-only twin used to bucket thousands of images without decoding them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from .errors import DatasetError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lora_trainer")

Size = tuple[int, int]  # (width, height) in pixels

_ORIENTATION = 0x0112  # EXIF tag
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that rotate by 90 degrees
_WHITE = (255, 255, 255)


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` fully, turn it upright (EXIF) and convert it to RGB; raise DatasetError if unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not in the middle of training
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _unreadable(path, exc) from None


def image_size(path: Path) -> Size:
    """(width, height) as ``load_image`` will return it, read from the header only where the format allows."""
    path = Path(path)
    try:
        with Image.open(path) as img:  # lazy: parses the header, decodes no pixels
            width, height = img.size
            if _orientation(img) in _SWAPS_SIDES:
                width, height = height, width
            return width, height
    except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
        raise _unreadable(path, exc) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels become white, high-bit-depth gray is scaled to 0..255."""
    import numpy as np  # here, not at the top: scanning a dataset needs neither numpy nor torch

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF gray: 0..65535 -> 0..255 (PIL's own convert would clip, turning most pixels white).
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        # Float images have no standard range: treat <= 1.0 as 0..1, otherwise as 0..255.
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "La":  # premultiplied alpha: PIL converts it only via LA
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def image_to_tensor(img: Image.Image, bucket: Size, flip: bool = False) -> torch.Tensor:
    """Resize ``img`` to cover ``bucket`` (aspect kept), centre-crop to it: float32 [3, h, w] in [-1, 1]."""
    import numpy as np
    import torch

    width, height = int(bucket[0]), int(bucket[1])
    if img.mode != "RGB" or "transparency" in img.info:
        img = to_rgb(img)
    src_w, src_h = img.size
    (new_w, new_h), (left, top) = cover_and_crop(img.size, bucket)
    if (new_w, new_h) != (src_w, src_h):
        # LANCZOS keeps detail when shrinking; BICUBIC rings less when enlarging.
        shrinking = max(width / src_w, height / src_h) < 1
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample=resample)
    img = img.crop((left, top, left + width, top + height))
    if flip:
        img = ImageOps.mirror(img)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # [h, w, 3], a copy so it is writable
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def cover_and_crop(source: Size, bucket: Size) -> tuple[Size, tuple[int, int]]:
    """How ``image_to_tensor`` fits an image of size ``source`` into ``bucket`` (both (width, height)):
    the resized size that covers the bucket with the aspect kept, and the (left, top) of the centred crop."""
    width, height = int(bucket[0]), int(bucket[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"bucket must have positive sides, got {bucket}")
    src_w, src_h = int(source[0]), int(source[1])
    scale = max(width / src_w, height / src_h)
    # max() guards against rounding one side just below the bucket.
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    return (new_w, new_h), ((new_w - width) // 2, (new_h - height) // 2)


def _orientation(img: Image.Image) -> int:
    # PNG's getexif() decodes the whole image when the eXIf chunk is not in the header;
    # such files are rare, so read EXIF from the header only and keep the scan cheap.
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF is not a reason to drop the image; load_image decides later
        return 1


def _unreadable(path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(f"{path}: cannot be read as an image ({_reason(path, exc)})")


def _reason(path: Path, exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError) and path.is_file() and path.stat().st_size == 0:
        return "empty file"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels, refused as a possible decompression bomb"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image or an unsupported format"
    text = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    text = text.replace(str(getattr(exc, "filename", "") or "\0"), "").strip(" :'\"")
    return text[:200] or type(exc).__name__
