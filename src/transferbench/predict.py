"""Classify images with a finished run's model: the run's own preprocessing, batched, top-k classes with
probabilities; an unreadable image gets its own error row and the rest are still classified."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .finished import load_finished_run
from .host import pick_device
from .images import IMAGE_EXTENSIONS, decode_file


@dataclass
class Prediction:
    path: str
    classes: list[str]  # best first
    probs: list[float]
    error: str | None = None


def find_images(paths: list[str]) -> list[Path]:
    """Files, folders (their images, recursively) and glob patterns, in the order given, each file once."""
    found: list[Path] = []
    for text in paths:
        matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))] if glob.has_magic(text) else [Path(text)]
        if not matches:
            raise UserError(f"{text} matches no file")
        for path in matches:
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            elif path.exists():
                found.append(path)
            else:
                raise UserError(f"{path} does not exist")
    return list(dict.fromkeys(found))


def predict_images(run_dir: str | Path, paths: list[str], *, top_k: int = 5, batch_size: int = 64,
                   device: str = "auto") -> list[Prediction]:
    if top_k < 1 or batch_size < 1:
        raise UserError(f"--top-k and --batch-size must be >= 1, got {top_k} and {batch_size}")
    run = load_finished_run(run_dir)
    files = find_images(paths)
    if not files:
        raise UserError(f"no images among {', '.join(paths)} ({', '.join(IMAGE_EXTENSIONS)})")
    dev = pick_device(device)
    model = run.model.to(dev).eval()
    prep = run.preprocess(dev, channels_last=False)
    k = min(top_k, len(run.classes))
    out: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        batch, arrays = files[start:start + batch_size], []
        for path in batch:
            try:
                # Stored images were brought to the run's size the same way (shorter side, centre crop).
                arrays.append((path, decode_file(path, run.image_size)))
            except UserError as err:
                out.append(Prediction(str(path), [], [], error=str(err)))
        if not arrays:
            continue
        x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for _, a in arrays]).to(dev)
        with torch.inference_mode():
            probs = model(prep(x)).float().softmax(1).cpu()
        top = probs.topk(k, dim=1)
        for (path, _), idx, p in zip(arrays, top.indices.tolist(), top.values.tolist()):
            out.append(Prediction(str(path), [run.classes[i] for i in idx], p))
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(out, key=lambda r: order[r.path])
