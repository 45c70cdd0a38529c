"""Cached backbone features for linear probes.

A frozen backbone computes the same features every epoch, so compute them once: run the backbone in
eval mode, capture what goes into the classifier, and store it under a key hashed from the *contents*
of everything that determines it (model name, backbone weights, preprocessing, the split's images).
Any change in those gives a new key; stale features can never be reused.
"""
from __future__ import annotations

import hashlib
import sys

import torch
from torch import nn
from tqdm import tqdm

from . import images, rundir
from .config import RunConfig, cache_dir
from .data import Batches, Splits
from .errors import UserError
from .images import ImageSet, load_cached
from .models import ModelBundle
from .preprocess import Preprocess
from .strategies import Strategy

KEY_VERSION = "features-v1"


def use_feature_cache(cfg: RunConfig, strategy: Strategy) -> bool:
    if cfg.feature_cache and not strategy.can_cache_features:
        raise UserError(f"--feature-cache only applies to strategy linear-probe, not '{cfg.strategy}'")
    if not strategy.can_cache_features:
        return False
    if strategy.fits_features:
        return True
    augmented = cfg.augment != "none"
    if cfg.feature_cache and augmented:
        raise UserError("--feature-cache and augmentation do not mix (cached features are of un-augmented images): "
                        "add --no-augment, or drop --feature-cache")
    return not augmented if cfg.feature_cache is None else bool(cfg.feature_cache)


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")


def feature_key(bundle: ModelBundle, prep: Preprocess, model_name: str, split: ImageSet) -> str:
    h = hashlib.sha256(f"{KEY_VERSION}|{model_name}|{bundle.source}:{bundle.arch}|{prep.size}|{prep.mode}".encode())
    _update(h, prep.mean)
    _update(h, prep.std)
    head = bundle.head + "."
    for name, tensor in bundle.model.state_dict().items():
        if not name.startswith(head):
            h.update(name.encode())
            _update(h, tensor)
    images.update_hash(h, split.images)  # digest as _update's, without reading a disk-backed split into memory
    _update(h, split.labels)
    return h.hexdigest()[:32]


@torch.no_grad()  # not inference_mode: the features are later inputs to a head that trains
def extract_features(bundle: ModelBundle, split: ImageSet, prep: Preprocess, device: torch.device,
                     batch_size: int, desc: str = "features", progress: bool = True) -> torch.Tensor:
    """The classifier's input for every image, backbone in eval mode: (N, D) float32 on the CPU."""
    model = bundle.model
    head = model.get_submodule(bundle.head)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(split), batch_size)
        for start in tqdm(starts, desc=desc, leave=False, file=sys.stderr) if progress else starts:
            x = split.images[start:start + batch_size].to(device)
            model(prep(x))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def cached_features(bundle: ModelBundle, split: ImageSet, prep: Preprocess, model_name: str, device: torch.device,
                    batch_size: int, desc: str, progress: bool = True) -> ImageSet:
    path = cache_dir() / "features" / f"{feature_key(bundle, prep, model_name, split)}.pt"
    feats = load_cached(path, "features", len(split)) if path.is_file() else None
    if feats is None:
        feats = extract_features(bundle, split, prep, device, batch_size, desc, progress)
        rundir.writable_dir(path.parent, "the cache directory (TRANSFERBENCH_CACHE)")
        rundir.atomic_torch_save({"features": feats}, path)
    return ImageSet(feats, split.labels, split.classes)


def cached_head_training_inputs(bundle: ModelBundle, splits: Splits, prep: Preprocess, cfg: RunConfig,
                                device: torch.device, progress: bool = True):
    """Batches of cached features for train / val / test, and the module that trains on them (the head)."""
    sets = [cached_features(bundle, s, prep, cfg.model, device, cfg.batch_size * 2, f"features ({name})", progress)
            for name, s in (("train", splits.train), ("val", splits.val), ("test", splits.test))]
    head: nn.Module = bundle.model.get_submodule(bundle.head)
    return (*(Batches(s, None, device) for s in sets), head)
