"""From stored uint8 images to what a model takes: the weights' preprocessing contract (`DataConfig`) and
`Preprocess`, which resizes, normalises and augments whole batches on the training device."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from torchvision.ops import roi_align
from torchvision.transforms import v2


@dataclass(frozen=True)
class DataConfig:
    """How a model's weights expect their input: resolution, normalisation, resampling filter."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear"))


class Preprocess:
    """uint8 batch -> normalised float batch at the model's resolution, augmented if asked.

    Every augmentation works on the whole batch on the training device, each image with its own random
    parameters drawn from the caller's generator (so a resumed epoch replays the same draws):
    - crop-flip: a random crop with reflect padding (1/8 of the side) and a horizontal flip, by index
      arithmetic at the stored resolution, before resizing (airbench's);
    - rrc: random-resized-crop (area 8-100%, aspect 3/4-4/3) + flip: every image's box resampled to the
      output size in one batched op (torchvision's roi_align, bilinear);
    - trivialaugment / randaugment: torchvision's transforms.v2, one call per image (their parameters are
      per call), so slower: bench/augment.py measures each policy;
    - random erasing (timm's), after normalisation.
    """

    def __init__(self, image_size: int, mean, std, interpolation: str, device: torch.device, channels_last: bool,
                 policy: str = "crop-flip", random_erasing: float = 0.0):
        self.size = image_size
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.policy = policy
        self.random_erasing = random_erasing

    @classmethod
    def build(cls, data_config: DataConfig, image_size: int, device: torch.device, channels_last: bool,
              policy: str = "crop-flip", random_erasing: float = 0.0) -> "Preprocess":
        return cls(image_size, data_config.mean, data_config.std, data_config.interpolation, device, channels_last,
                   policy, random_erasing)

    @staticmethod
    def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
        idx = idx.abs()
        return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)

    def crop_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        pad = max(1, round(min(h, w) / 8))
        dev = x.device
        dy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator) - pad
        dx = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator) - pad
        flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
        rows = self._reflect(dy + torch.arange(h, device=dev), h)
        cols = torch.arange(w, device=dev).expand(b, w)
        cols = torch.where(flip, w - 1 - cols, cols)
        cols = self._reflect(dx + cols, w)
        out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
        return out.permute(0, 3, 1, 2)

    def random_resized_crop(self, x: torch.Tensor, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
        """torchvision's RandomResizedCrop + flip for a whole batch: float (b, c, size, size)."""
        b, _, h, w = x.shape
        dev = x.device
        u = torch.rand(b, 5, device=dev, generator=generator)
        area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
        cw = (area * log_r.exp()).sqrt().clamp(1, w)  # a box that does not fit is clipped to the image
        ch = (area / log_r.exp()).sqrt().clamp(1, h)
        x0, y0 = u[:, 2] * (w - cw), u[:, 3] * (h - ch)
        boxes = torch.stack([torch.arange(b, device=dev, dtype=x0.dtype), x0, y0, x0 + cw, y0 + ch], 1)
        # sampling_ratio -1: ceil(box / output) samples per output pixel and axis, so a box larger than the output is
        # averaged (no aliasing) and a smaller one is plain bilinear interpolation
        out = roi_align(x.float(), boxes, output_size=(self.size, self.size), spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True)
        return torch.where((u[:, 4] < 0.5)[:, None, None, None], out.flip(-1), out)

    def policy_per_image(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """TrivialAugmentWide / RandAugment on uint8 images, each its own draw, from a seed taken from the
        caller's generator (torchvision draws from torch's global generator, forked here)."""
        transform = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[self.policy]()
        seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device, generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([transform(image) for image in x])

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.policy == "rrc":
            return self.random_resized_crop(x, generator)
        if self.policy in ("trivialaugment", "randaugment"):
            return self.crop_flip(self.policy_per_image(x, generator), generator)
        return self.crop_flip(x, generator) if self.policy == "crop-flip" else x

    def __call__(self, x: torch.Tensor, augment: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if augment:
            x = self.augment(x, generator)
        x = x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            down = x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=down and self.mode != "nearest",
                              align_corners=False if self.mode != "nearest" else None)
            if self.mode == "bicubic":
                x = x.clamp_(0, 255)
        x = (x - self.mean) / self.std
        if augment and self.random_erasing:
            x = self.erase(x, generator)
        return x.contiguous(memory_format=self.memory_format)

    def erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """timm's RandomErasing (per image, normal-noise pixels), seeded from the caller's generator."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device, generator=generator))
        state = random.getstate()
        random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return RandomErasing(self.random_erasing, mode="pixel", device=x.device)(x.contiguous())
        finally:
            random.setstate(state)
