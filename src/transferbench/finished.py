"""A finished run brought back: its model rebuilt from model.pt, its data and splits reloaded, its test
split re-evaluated. What `evaluate`, `export` and `predict` start from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import rundir
from .config import DatasetSpec, RunConfig
from .data import Batches, Dataset, Splits, load_dataset, make_splits
from .errors import UserError
from .host import pick_device
from .models import ModelBundle, create_model
from .preprocess import DataConfig, Preprocess
from .training import evaluate


@dataclass
class FinishedRun:
    run_dir: Path
    saved: dict  # what model.pt holds
    cfg: RunConfig
    bundle: ModelBundle  # on the CPU, the fine-tuned weights loaded

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def classes(self) -> list[str]:
        return list(self.saved["classes"])

    @property
    def image_size(self) -> int:
        return int(self.saved["image_size"])

    @property
    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(self.saved["data_config"])

    def preprocess(self, device: torch.device, channels_last: bool | None = None) -> Preprocess:
        """Exactly the run's evaluation preprocessing."""
        cl = self.cfg.channels_last if channels_last is None else channels_last
        return Preprocess.build(self.data_config, self.image_size, device, cl)

    def data(self, data_dir: str | None = None) -> Dataset:
        """The run's data, from `data_dir` if it moved: the CIFAR directory, or the image folder
        of a `folder:` dataset. Refused if its classes are no longer the ones the run learned."""
        spec = DatasetSpec.parse(self.cfg.dataset)
        if spec.kind in ("folder", "csv") and not data_dir and not spec.path.exists():
            raise UserError(f"the data this run was trained on is no longer at {spec.path}; if it moved, pass "
                            f"--data-dir NEW_PATH (the {spec.kind} it is now)")
        dataset = spec.moved_to(data_dir).canonical() if data_dir else self.cfg.dataset
        cfg = self.cfg
        data = load_dataset(dataset, data_dir or cfg.data_dir, storage_size=self.image_size, workers=cfg.workers,
                            test_fraction=cfg.test_fraction, seed=cfg.seed, image_column=cfg.image_column,
                            label_column=cfg.label_column)
        if list(data.classes) != self.classes:
            raise UserError(f"{dataset} now has classes {data.classes}, the run was trained on {self.classes}")
        return data

    def splits(self, data_dir: str | None = None) -> Splits:
        """The run's own splits (same seed, validation fraction and subset)."""
        cfg = self.cfg
        return make_splits(self.data(data_dir), val_fraction=cfg.val_fraction, train_subset=cfg.train_subset,
                           seed=cfg.seed)


def load_finished_run(run_dir: str | Path) -> FinishedRun:
    """What a finished run saved in model.pt, its configuration, and its model rebuilt on the CPU."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / rundir.MODEL
    if not path.is_file():
        config = run_dir / rundir.CONFIG
        if config.is_file() and rundir.read_json(config).get("strategy") == "knn":
            raise UserError(f"{run_dir} is a knn run: its classifier is the training features themselves, kept in no "
                            f"{rundir.MODEL}; its test predictions are in {rundir.PREDICTIONS}")
        raise UserError(f"{run_dir} has no {rundir.MODEL}: is it a finished transferbench run directory?")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    missing = [k for k in ("config", "classes", "data_config", "image_size", "state_dict")
               if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{path} is not a transferbench model file (missing: {', '.join(missing)})")
    cfg = RunConfig.from_dict(saved["config"], source=str(path))
    # image_size: ViT-style models are built for one input size
    bundle = create_model(cfg.model, len(saved["classes"]), image_size=int(saved["image_size"]))
    try:
        bundle.model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: the saved weights do not fit model '{cfg.model}' ({err})") from None
    return FinishedRun(run_dir, saved, cfg, bundle)


def evaluate_run(run_dir: str | Path, *, device: str = "auto", data_dir: str | None = None) -> dict:
    """Rebuild a finished run's model from model.pt and re-evaluate its test split."""
    run = load_finished_run(run_dir)
    dev = pick_device(device)
    test = run.data(data_dir).test
    model = run.bundle.model.to(dev)
    if run.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    test_loss, test_acc = evaluate(model, Batches(test, run.preprocess(dev), dev), run.cfg.batch_size * 2,
                                   dev.type == "cuda" and run.cfg.amp is not False)
    return {"test_acc": test_acc, "test_loss": test_loss, "recorded_test_acc": run.saved["test_acc"],
            "test_images": len(test)}
