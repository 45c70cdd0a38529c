"""One experiment, top to bottom: data, model, strategy phases, the training loop, the record.

`run(config)` is what `transferbench run` calls. The loop is the same for every strategy; a strategy
only says which parameters train in which phase. Under `torchrun` the same loop runs data-parallel.
"""
from __future__ import annotations

import copy
import math
import platform
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, rundir
from .config import RunConfig
from .data import ImageSet, Preprocess, batch_indices, load_dataset, make_splits
from .errors import UserError
from .models import ModelBundle, check_input_size, create_model, data_config
from .strategies import Phase, apply_trainable, count_params, parse_strategy, phases, set_train_mode

# Options that may differ when a run is resumed: where and how fast it runs, not what it computes.
RESUMABLE_DIFFERENCES = {"device", "workers", "output_dir", "compile"}


def log(*args) -> None:
    if distributed.is_main():
        print(*args, flush=True)


def warn(message: str) -> None:
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def tune_host_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    Activations of a CPU training step are tens to hundreds of MB each; by default glibc mmaps every such
    block and unmaps it on free, so each step page-faults (and zeroes) its whole working set again. With
    EfficientNet-Lite0, batch 256 at 160 px, that was half the step's time spent in the kernel; this halves
    the step time at the cost of a higher resident peak (bench/allocator.py measures both). Process-wide, so
    the CLI calls it, not the library. No-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))  # -1: never trim


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class Batches:
    """A split on the training device: uint8 images (or cached features) plus how to prepare them."""

    data: ImageSet
    prep: Callable[..., torch.Tensor] | None  # None: inputs are already model-ready (cached features)
    device: torch.device

    def __post_init__(self):
        # Small enough datasets live on the accelerator for the whole run: no per-batch copies.
        if self.device.type == "cuda" and self.data.images.numel() < 4 << 30:
            self.data = ImageSet(self.data.images.to(self.device), self.data.labels.to(self.device), self.data.classes)

    def __len__(self) -> int:
        return len(self.data)

    def iterate(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, aug_generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in batch_indices(len(self.data), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                                 rank=distributed.rank(), world_size=distributed.world_size()):
            idx = idx.to(self.data.images.device)
            x = self.data.images[idx].to(self.device, non_blocking=True)
            y = self.data.labels[idx].to(self.device, non_blocking=True)
            yield (self.prep(x, augment, aug_generator) if self.prep else x), y


def autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_for(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=autocast_dtype(device))


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, batch_size: int, amp: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every image of the split exactly once, across all ranks."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=batches.device)  # loss sum, correct, count
    for x, y in batches.iterate(batch_size):
        with autocast_for(batches.device, amp):
            logits = model(x)
        stats[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        stats[1] += (logits.argmax(1) == y).sum()
        stats[2] += len(y)
    distributed.all_reduce_sum(stats)
    model.train(was_training)
    loss, correct, count = stats.tolist()
    return loss / max(count, 1), correct / max(count, 1)


def build_optimizer(model: nn.Module, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters: standard practice (timm, torchvision refs).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def reset_peak_memory(device: torch.device) -> None:
    """So that each run of a study reports its own peak, not the process's largest so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset; KiB on Linux


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__}


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> dict | None:
    """Return the checkpoint to resume from, or None for a fresh run; refuse to clobber silently."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            warn(f"--resume: {run_dir} has nothing to resume; starting a fresh run")
        return None
    if overwrite:
        for name in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY, rundir.MODEL, rundir.CHECKPOINT, rundir.CURVES):
            (run_dir / name).unlink(missing_ok=True)
        return None
    if not resume:
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it, --overwrite to "
                        f"replace it, or --name to choose another")
    if (run_dir / rundir.SUMMARY).exists():
        raise UserError(f"run {run_dir} is already complete (summary.json exists); nothing to resume")
    saved = rundir.read_json(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).exists() else None
    if saved is not None:
        now = cfg.to_dict()
        diffs = [k for k in now if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now[k]]
        if diffs:
            k = diffs[0]
            raise UserError(f"--resume: {run_dir} was started with {k}={saved.get(k)!r}, now {k}={now[k]!r}; "
                            f"resume with the same options or start a new run with --name")
    if not (run_dir / rundir.CHECKPOINT).exists():
        return None  # killed before its first epoch ended: start over in place
    return torch.load(run_dir / rundir.CHECKPOINT, map_location="cpu", weights_only=False)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    from .report import curves_figure

    fig = curves_figure(history, title)
    rundir.atomic_savefig(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train and evaluate one experiment; returns the summary written to summary.json."""
    cfg = cfg.resolved()
    distributed.setup(cfg.device)
    strategy = parse_strategy(cfg.strategy)
    device = pick_device(cfg.device)
    if strategy.kind not in ("scratch",) and not cfg.pretrained and not cfg.weights:
        warn(f"strategy '{cfg.strategy}' on a randomly initialised {cfg.model}: no pretrained weights "
             f"(--pretrained or --weights FILE), so nothing is transferred")
    contract = data_config(cfg.model)
    cfg.image_size = cfg.image_size or contract.input_size
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    outcome = None
    if distributed.is_main():
        try:
            outcome = ("ok", _prepare_run_dir(run_dir, cfg, resume, overwrite))
        except UserError as err:
            outcome = ("error", str(err))
    status, checkpoint = distributed.broadcast_object(outcome)  # every rank stops if rank 0 must
    if status == "error":
        raise UserError(checkpoint)

    torch.manual_seed(cfg.seed)
    reset_peak_memory(device)
    train_all, test = load_dataset(cfg.dataset, cfg.data_dir, storage_size=cfg.image_size, workers=cfg.workers)
    splits = make_splits(train_all, test, val_fraction=cfg.val_fraction, train_subset=cfg.train_subset, seed=cfg.seed)
    classes = splits.classes
    bundle = create_model(cfg.model, len(classes), pretrained=bool(cfg.pretrained), weights=cfg.weights,
                          image_size=cfg.image_size)
    model = bundle.model.to(device)
    check_input_size(bundle, cfg.image_size, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = device.type == "cuda" and cfg.amp is not False
    plan = phases(model, bundle.head, strategy, cfg.epochs, cfg.head_epochs, cfg.unfreeze_lr_scale)
    if distributed.is_main():  # only now that data, model and strategy are known good: a failed start leaves nothing
        rundir.atomic_write_json(run_dir / rundir.CONFIG, cfg.to_dict())
    apply_trainable(model, plan[-1].trainable)
    trainable, total = count_params(model)
    log(f"{cfg.name}: {cfg.model} on {cfg.dataset} ({len(classes)} classes; train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test)}), strategy {cfg.strategy}, {cfg.image_size}px, "
        f"{trainable:,} of {total:,} parameters trainable, device {device}"
        + (f" x{distributed.world_size()}" if distributed.world_size() > 1 else ""))

    prep = Preprocess(cfg.image_size, contract.mean, contract.std, contract.interpolation, device, cfg.channels_last)
    from .features import use_feature_cache

    use_cache = use_feature_cache(cfg, strategy)
    if use_cache:
        from .features import cached_head_training_inputs

        train_b, val_b, test_b, step_model = cached_head_training_inputs(bundle, splits, prep, cfg, device,
                                                                               progress and distributed.is_main())
    else:
        train_b, val_b, test_b = (Batches(s, prep, device) for s in (splits.train, splits.val, splits.test))
        step_model = model

    history: list[dict] = []
    best = {"epoch": None, "val_acc": -1.0, "state": None}
    start_epoch = 0
    if checkpoint is not None:
        step_model.load_state_dict(checkpoint["model"])
        history, best, start_epoch = checkpoint["history"], checkpoint["best"], checkpoint["epoch"] + 1
        log(f"resuming {run_dir} after epoch {checkpoint['epoch']}")
    eval_bs = cfg.batch_size * 2
    steps_per_epoch = len(batch_indices(len(train_b), cfg.batch_size, shuffle=False, drop_last=True,
                                        world_size=distributed.world_size()))

    for phase in plan:
        if phase.end_epoch <= start_epoch or phase.end_epoch == phase.first_epoch:
            continue
        train_model, optimizer, scheduler, scaler = _start_phase(step_model, model, phase, cfg, steps_per_epoch, amp, device, use_cache)
        if checkpoint is not None and checkpoint["phase"] == phase.index and start_epoch > phase.first_epoch:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
        for epoch in range(max(phase.first_epoch, start_epoch), phase.end_epoch):
            torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout etc.: resume replays the same randomness
            order_gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
            aug_gen = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch) + 1)
            set_train_mode(step_model, cfg.bn_frozen)
            t0 = time.perf_counter()
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
            for step, (x, y) in enumerate(train_b.iterate(cfg.batch_size, shuffle=True, augment=cfg.augment and not use_cache,
                                                          generator=order_gen, aug_generator=aug_gen, drop_last=True)):
                with autocast_for(device, amp):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                stats[0] += loss.detach() * len(y)
                stats[1] += (logits.detach().argmax(1) == y).sum()
                stats[2] += len(y)
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 9 or step == steps_per_epoch - 1:  # the only host sync in the loop
                        s = stats.tolist()
                        bar.set_postfix(loss=f"{s[0] / s[2]:.4f}", acc=f"{s[1] / s[2]:.4f}",
                                        img_s=f"{s[2] * distributed.world_size() / (time.perf_counter() - t0):.0f}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            distributed.all_reduce_sum(stats)
            loss_sum, correct, count = stats.tolist()
            if not math.isfinite(loss_sum):
                last = (f"the last good checkpoint (epoch {checkpoint_epoch(run_dir)}) is kept in {run_dir}"
                        if (run_dir / rundir.CHECKPOINT).exists() else "no epoch completed, so no checkpoint was written")
                raise UserError(f"training loss became NaN/inf in epoch {epoch + 1}; {last}. "
                                f"Lower --lr (now {cfg.lr * phase.lr_scale:g}) or check the data.")
            val_loss, val_acc = evaluate(step_model, val_b, eval_bs, amp)
            row = {"epoch": epoch + 1, "phase": phase.index, "train_loss": loss_sum / count, "train_acc": correct / count,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_time_s": epoch_time, "images_per_s": count / epoch_time}
            history.append(row)
            if val_acc > best["val_acc"]:
                best = {"epoch": epoch + 1, "val_acc": val_acc,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in step_model.state_dict().items()}}
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {row['lr']:.2e}  {epoch_time:.1f}s  "
                f"{row['images_per_s']:.0f} img/s" + ("  *" if best["epoch"] == epoch + 1 else ""))
            if distributed.is_main():
                rundir.atomic_write_jsonl(run_dir / rundir.METRICS, history)
                rundir.atomic_torch_save({
                    "epoch": epoch, "phase": phase.index, "model": step_model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "history": history, "best": best}, run_dir / rundir.CHECKPOINT)
            after_epoch(epoch + 1)

    if best["state"] is None:  # zero-shot: nothing trained, the untrained head is the model
        val_loss, val_acc = evaluate(step_model, val_b, eval_bs, amp)
        history = [{"epoch": 0, "phase": 0, "train_loss": None, "train_acc": None, "val_loss": val_loss,
                    "val_acc": val_acc, "lr": 0.0, "epoch_time_s": 0.0, "images_per_s": None}]
        best = {"epoch": 0, "val_acc": val_acc, "state": copy.deepcopy(step_model.state_dict())}
    step_model.load_state_dict(best["state"])
    test_loss, test_acc = evaluate(step_model, test_b, eval_bs, amp)
    trained = [h for h in history if h["train_loss"] is not None]
    train_time = sum(h["epoch_time_s"] for h in trained)
    summary = {
        "test_acc": test_acc, "test_loss": test_loss, "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
        "epochs": cfg.epochs, "trainable_params": trainable, "total_params": total, "train_time_s": train_time,
        "images_per_s": sum(h["images_per_s"] * h["epoch_time_s"] for h in trained) / train_time if train_time else None,
        "peak_memory_mb": peak_memory_mb(device), "model": cfg.model, "dataset": cfg.dataset, "strategy": cfg.strategy,
        "seed": cfg.seed, "image_size": cfg.image_size, "num_classes": len(classes), "device": str(device),
        "world_size": distributed.world_size(), "feature_cache": use_cache, "augment": cfg.augment and not use_cache,
        "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test),
        "versions": versions(),
    }
    if distributed.is_main():
        rundir.atomic_write_jsonl(run_dir / rundir.METRICS, history)
        rundir.atomic_torch_save({
            "format": 1, "config": cfg.to_dict(), "classes": classes, "data_config": contract.to_dict(),
            "image_size": cfg.image_size, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "test_acc": test_acc}, run_dir / rundir.MODEL)
        plot_curves(history, run_dir / rundir.CURVES, f"{cfg.name}: {cfg.model} on {cfg.dataset}")
        rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
        (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)  # the run is complete: model.pt supersedes it
    log(f"{cfg.name}: test acc {test_acc:.4f} (best val acc {best['val_acc']:.4f} at epoch {best['epoch']}), "
        f"train time {train_time:.1f}s -> {run_dir}")
    distributed.barrier()
    return summary


def after_epoch(epoch: int) -> None:
    """Called once each epoch's checkpoint is on disk; tests replace it to simulate a killed run."""


def checkpoint_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / rundir.CHECKPOINT, map_location="cpu", weights_only=False)["epoch"] + 1


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not distributed.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _start_phase(step_model: nn.Module, model: nn.Module, phase: Phase, cfg: RunConfig, steps_per_epoch: int,
                 amp: bool, device: torch.device, use_cache: bool):
    """Everything that depends on which parameters train is rebuilt here, at each phase boundary:
    requires_grad, the optimizer, the schedule, the DDP wrapper and any compiled graph (a graph
    compiled before requires_grad changed would silently keep a layer frozen)."""
    if not use_cache:
        apply_trainable(model, phase.trainable)
    optimizer = build_optimizer(step_model, cfg, cfg.lr * phase.lr_scale)
    epochs = phase.end_epoch - phase.first_epoch
    total = max(1, epochs * steps_per_epoch)
    scheduler = warmup_cosine(optimizer, total, min(total - 1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 0)
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    train_model = distributed.wrap(step_model, device)
    if cfg.compile:
        torch._dynamo.reset()
        train_model = torch.compile(train_model)
    return train_model, optimizer, scheduler, scaler


def load_finished_run(run_dir: str | Path) -> tuple[dict, RunConfig, ModelBundle]:
    """What a finished run saved in model.pt, its configuration, and its model rebuilt on the CPU."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / rundir.MODEL
    if not path.is_file():
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
    return saved, cfg, bundle


def load_run_data(saved: dict, cfg: RunConfig, data_dir: str | None = None) -> tuple[ImageSet, ImageSet]:
    """A finished run's (train, test) data, from `data_dir` if it moved: the CIFAR directory, or the
    image folder of a `folder:` dataset. Refused if its classes are no longer the ones the run learned."""
    dataset = f"folder:{data_dir}" if data_dir and cfg.dataset.startswith("folder:") else cfg.dataset
    train, test = load_dataset(dataset, data_dir or cfg.data_dir, storage_size=int(saved["image_size"]), workers=cfg.workers)
    if list(test.classes) != list(saved["classes"]):
        raise UserError(f"the test split of {dataset} now has classes {test.classes}, the run was trained on {saved['classes']}")
    return train, test


def evaluate_run(run_dir: str | Path, *, device: str = "auto", data_dir: str | None = None) -> dict:
    """Rebuild a finished run's model from model.pt and re-evaluate its test split."""
    saved, cfg, bundle = load_finished_run(run_dir)
    dev = pick_device(device)
    _, test = load_run_data(saved, cfg, data_dir)
    model = bundle.model.to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dc = saved["data_config"]
    prep = Preprocess(saved["image_size"], dc["mean"], dc["std"], dc["interpolation"], dev, cfg.channels_last)
    test_loss, test_acc = evaluate(model, Batches(test, prep, dev), cfg.batch_size * 2, dev.type == "cuda" and cfg.amp is not False)
    return {"test_acc": test_acc, "test_loss": test_loss, "recorded_test_acc": saved["test_acc"], "test_images": len(test)}
