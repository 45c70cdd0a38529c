"""Images as data: decoding any image file to an upright uint8 RGB array, a labelled set of them as one
(N, 3, H, W) uint8 tensor, and the cache files decoded sets are kept in."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes)



def image_array(im, size: int | None) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 RGB array, upright, at size x size when size is given.

    EXIF orientation is applied (phones store portrait photos sideways); 16-bit and float images are
    scaled to 8 bits by their range, not clipped (PIL's convert("RGB") turns 16-bit mid-grey white);
    palette, grayscale and alpha images become RGB. Resizing is shorter side to `size`, then a centre
    crop: the torchvision eval convention.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":  # how PIL opens some 16-bit files: 8-bit data stays 8-bit
            top = 65535.0 if arr.max() > 255 else 255.0
        else:  # "F": [0, 1] floats, or any other range by its maximum
            top = max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top_ = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top_, left + size, top_ + size))
    return np.asarray(im, dtype=np.uint8)


def decode_file(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return image_array(im, size)
    except Exception as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as decoded: after the EXIF rotation image_array applies."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)  # 90-degree orientations
    except Exception as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); fix or remove the file") from None


def load_cached(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """A tensor from a cache file, or None (with a warning, the file removed) when the file is unreadable
    or does not hold `rows` rows: a cache is rebuilt, never trusted blindly and never fatal."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)[key]
        if not isinstance(tensor, torch.Tensor) or len(tensor) != rows:
            raise ValueError(f"expected {rows} rows")
        return tensor
    except Exception as err:
        log.warning(f"cache file {path} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        path.unlink(missing_ok=True)
        return None


