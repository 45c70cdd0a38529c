"""From stored uint8 images to what a model takes: the weights' preprocessing contract (`DataConfig`) and
`Preprocess`, which resizes, normalises and augments whole batches on the training device."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


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

    Augmentation is a random crop with reflect padding (1/8 of the side) and a horizontal flip,
    done by index arithmetic on the whole batch at its stored resolution, before resizing.
    """

    def __init__(self, image_size: int, mean, std, interpolation: str, device: torch.device, channels_last: bool):
        self.size = image_size
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @classmethod
    def build(cls, data_config: DataConfig, image_size: int, device: torch.device, channels_last: bool) -> "Preprocess":
        return cls(image_size, data_config.mean, data_config.std, data_config.interpolation, device, channels_last)

    @staticmethod
    def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
        idx = idx.abs()
        return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
        return x.contiguous(memory_format=self.memory_format)


