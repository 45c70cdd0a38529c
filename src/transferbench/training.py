"""One experiment, top to bottom: `run(config)` is what `transferbench run` calls.

    prepare        the run directory (fresh, resumed or replaced), data, model, strategy: all checked
                   before anything is written
    for each phase of the strategy:
        start_phase        requires_grad, optimizer, schedule, DDP wrapper, compiled graph
        for each epoch:
            train_one_epoch    one pass over the training split
            end_epoch          validate, keep the best weights, checkpoint
    finish         test the selected weights once, write the record

The loop is the same for every strategy; a strategy only says which parameters train in which phase.
Under `torchrun` the same loop runs data-parallel (see `distributed`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm.optim
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from . import distributed, metrics, plots, probes, rundir
from .config import RunConfig, differences
from .data import Batches, Dataset, Splits, batch_indices, check_dataset, concat, fingerprint, load_dataset, make_splits
from .errors import UserError
from .features import cached_features, cached_head_training_inputs, use_feature_cache
from .host import peak_memory_mb, pick_device, reset_peak_memory, versions
from .models import ModelBundle, check_input_size, create_model, data_config, resolve_name
from .preprocess import Preprocess
from .strategies import Phase, Strategy, apply_trainable, count_params, parse_strategy, set_train_mode
from .trackers import Tracker, exit_status, open_trackers

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> None:
    """Everything about a configuration that can be checked without reading data or building a model:
    its values, its dataset's name or location, its model's name. `run` and `study --dry-run` call it."""
    cfg.validate()
    check_dataset(cfg.dataset)
    resolve_name(cfg.model)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_for(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=autocast_dtype(device))


@torch.inference_mode()
def predict(model: nn.Module, batches: Batches, batch_size: int,
            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels of every image of the split once, in split order, from all ranks."""
    was_training = model.training
    model.eval()
    parts = []
    for idx, x, y in batches.indexed(batch_size):
        with autocast_for(batches.device, amp):
            logits = model(x)
        parts.append((idx.cpu(), logits.float().cpu(), y.cpu()))
    model.train(was_training)
    parts = [p for rank_parts in distributed.gather_objects(parts) for p in rank_parts]
    if not parts:
        raise UserError("an evaluation split is empty: nothing to evaluate on")
    index, logits, labels = (torch.cat(t) for t in zip(*parts))
    order = index.argsort()
    return logits[order], labels[order]


def evaluate(model: nn.Module, batches: Batches, batch_size: int, amp: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every image of the split exactly once, across all ranks."""
    logits, labels = predict(model, batches, batch_size, amp)
    loss = F.cross_entropy(logits.double(), labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item()


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay: parameter name -> lr factor, 1 for the head and `decay` per block below
    it. timm models say what a block is (their group_matcher, through timm's param_groups_layer_decay);
    torchvision models by their top-level stages (a long nn.Sequential such as MobileNet's `features`
    counts each of its children as one)."""
    if hasattr(model, "group_matcher"):
        ids = {id(p): name for name, p in model.named_parameters()}
        groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.0, layer_decay=decay)
        return {ids[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    stages: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 3:
            stages += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            stages.append(name)
    scales = {}
    for pname, _ in model.named_parameters():
        stage = next(i for i, s in enumerate(stages) if pname == s or pname.startswith(s + "."))
        scales[pname] = decay ** (len(stages) - 1 - stage)
    return scales


def build_optimizer(model: nn.Module, cfg: RunConfig, lr: float, head: str | None = None) -> torch.optim.Optimizer:
    """Parameter groups by (learning-rate factor, weight decay). No weight decay on biases and normalisation
    parameters (timm, torchvision references); the new head at --head-lr-scale; --layer-decay below it."""
    scales = layer_scales(model, cfg.layer_decay) if cfg.layer_decay else {}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = scales.get(name, 1.0) * (cfg.head_lr_scale if head and name.startswith(head + ".") else 1.0)
        groups.setdefault((scale, cfg.weight_decay if p.ndim > 1 else 0.0), []).append(p)
    param_groups = [{"params": ps, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
                    for (scale, wd), ps in groups.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------- the experiment

@dataclass
class Experiment:
    """Everything a run needs, checked and built before its first step."""

    cfg: RunConfig
    run_dir: Path  # where its files are written: final_dir, or a staging directory beside it under --overwrite
    final_dir: Path
    device: torch.device
    strategy: Strategy
    bundle: ModelBundle  # bundle.model: the whole network, what model.pt saves
    splits: Splits
    plan: list[Phase]
    learner: nn.Module  # what the optimizer steps: the model, or its head when it trains on cached features
    train: Batches
    val: Batches
    test: Batches
    cached: bool  # the learner trains on cached backbone features
    amp: bool
    steps_per_epoch: int
    checkpoint: dict | None  # what a resumed run continues from
    progress: bool
    data: str  # the data's fingerprint: a resumed run must see the same
    primary_metric: str = "top1"  # what the literature reports for this dataset
    test_files: list[str] | None = None  # a test split carved from the data: recorded in the run directory
    tracker: Tracker = field(default_factory=Tracker)  # --log: where else each epoch and the summary go
    fitted: dict | None = None  # logreg / knn: what the protocol chose, its validation curve and time
    augmented: bool = False  # training batches are augmented (never for cached features)
    mixup: Mixup | None = None  # --mixup / --cutmix
    ema: ModelEmaV3 | None = None  # --ema

    @property
    def model(self) -> nn.Module:
        return self.bundle.model

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.batch_size * 2


@dataclass
class Progress:
    """What the run has done so far: the checkpoint holds exactly this, plus the optimizer's state."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "val_acc": -1.0, "state": None})
    start_epoch: int = 0


@dataclass
class PhaseState:
    phase: Phase
    forward: nn.Module  # the learner as the step calls it: wrapped for DDP, compiled, or itself
    head_only: str | None  # the head's name when nothing else trains (everything else then runs in eval mode)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[Path, dict | None]:
    """Where to write, and the checkpoint to resume from (None for a fresh run); refuse to clobber silently.
    --overwrite builds the new run in a staging directory beside the old one, which is replaced only when
    the new run is complete: a run that fails to start, diverges or is killed leaves the old one whole."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory: choose another --name or --output-dir")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            log.warning(f"--resume: {run_dir} has nothing to resume; starting a fresh run")
        return run_dir, None
    if overwrite:
        staging = run_dir.with_name(f".{run_dir.name}.overwrite")
        shutil.rmtree(staging, ignore_errors=True)
        return staging, None
    if not resume:
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it, --overwrite to "
                        f"replace it, or --name to choose another")
    if (run_dir / rundir.SUMMARY).exists():
        raise UserError(f"run {run_dir} is already complete (summary.json exists); nothing to resume")
    if (run_dir / rundir.CONFIG).exists():
        saved = rundir.read_json(run_dir / rundir.CONFIG)
        diffs = differences(saved, cfg.to_dict())
        if diffs:
            k = diffs[0]
            raise UserError(f"--resume: {run_dir} was started with {k}={saved.get(k)!r}, now {k}={getattr(cfg, k)!r}; "
                            f"resume with the same options or start a new run with --name")
    path = run_dir / rundir.CHECKPOINT
    if not path.exists():
        return run_dir, None  # killed before its first epoch ended: start over in place
    try:  # tensors, numbers, lists and dicts only: a shared study directory never runs code from a file
        return run_dir, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"delete it to restart the run from its first epoch, or pass --overwrite") from None


def build_model(cfg: RunConfig, num_classes: int, device: torch.device) -> ModelBundle:
    """The run's model on its device, its input size checked, in its memory format (run and rank alike)."""
    bundle = create_model(cfg.model, num_classes, pretrained=bool(cfg.pretrained), weights=cfg.weights,
                          image_size=cfg.image_size, drop_path=cfg.drop_path)
    bundle.model.to(device)
    check_input_size(bundle, cfg.image_size, device)
    if cfg.channels_last:
        bundle.model.to(memory_format=torch.channels_last)
    return bundle


def load_splits(cfg: RunConfig, progress: bool = False) -> tuple[Dataset, Splits]:
    """The dataset, and the train/val/test splits a run of this (resolved) configuration trains, selects and tests
    on; `rank` scores the same ones."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir, storage_size=cfg.image_size, workers=cfg.workers,
                           progress=progress, test_fraction=cfg.test_fraction, seed=cfg.seed,
                           image_column=cfg.image_column, label_column=cfg.label_column)
    log.info(dataset.describe_store())
    splits = make_splits(dataset, val_fraction=cfg.val_fraction, train_subset=cfg.train_subset, seed=cfg.seed,
                         shots=cfg.shots)
    if cfg.refit:  # the chosen configuration retrained on everything but the test split; nothing left to select on
        splits = Splits(concat(splits.train, splits.val), splits.val, splits.test)
    return dataset, splits


def prepare(cfg: RunConfig, *, resume: bool, overwrite: bool, progress: bool) -> Experiment:
    """The run directory, data, model and strategy; config.json is written only once all are known good,
    so a failed start leaves nothing behind."""
    strategy = parse_strategy(cfg.strategy)
    device = pick_device(cfg.device)
    if not strategy.from_scratch and not cfg.pretrained and not cfg.weights:
        log.warning(f"strategy '{cfg.strategy}' on a randomly initialised {cfg.model}: no pretrained weights "
                    f"(--pretrained or --weights FILE), so nothing is transferred")
    preprocessing = data_config(cfg.model)
    cfg.image_size = cfg.image_size or preprocessing.input_size
    final_dir = Path(cfg.output_dir).expanduser() / cfg.name
    outcome = None
    if distributed.is_main():
        try:
            rundir.writable_dir(final_dir.parent, "--output-dir")
            outcome = ("ok", _prepare_run_dir(final_dir, cfg, resume, overwrite))
        except UserError as err:
            outcome = ("error", str(err))
    status, prepared = distributed.broadcast_object(outcome)  # every rank stops if rank 0 must
    if status == "error":
        raise UserError(prepared)
    run_dir, checkpoint = prepared

    torch.manual_seed(cfg.seed)
    reset_peak_memory(device)
    dataset, splits = load_splits(cfg, progress and distributed.is_main())
    data = fingerprint(splits)
    if checkpoint is not None and checkpoint.get("data", data) != data:
        raise UserError(f"--resume: the data of {final_dir} changed since the run started (fingerprint "
                        f"{checkpoint['data']}, now {data}): resume on the same data, or start a new run with --name "
                        f"or --overwrite")
    bundle = build_model(cfg, len(splits.classes), device)
    plan = strategy.phases(bundle.model, bundle.head, cfg.epochs, cfg.head_epochs, cfg.unfreeze_lr_scale)
    if cfg.head_init == "logreg":  # LP-FT: the head is fitted (see init_head), every epoch fine-tunes everything
        plan = [dataclasses.replace(plan[-1], first_epoch=0)]
    if distributed.is_main():
        rundir.atomic_write_json(run_dir / rundir.CONFIG, cfg.to_dict())
    apply_trainable(bundle.model, plan[-1].trainable)  # so the log line counts what trains in the end

    prep = Preprocess.build(preprocessing, cfg.image_size, device, cfg.channels_last, cfg.augment, cfg.random_erasing)
    cached = use_feature_cache(cfg, strategy)
    if cached:
        train, val, test_b, learner = cached_head_training_inputs(bundle, splits, prep, cfg, device,
                                                                 progress and distributed.is_main())
    else:
        train, val, test_b = (Batches(s, prep, device) for s in (splits.train, splits.val, splits.test))
        learner = bundle.model
    steps = len(batch_indices(len(train), cfg.batch_size, shuffle=False, drop_last=True,
                              world_size=distributed.world_size()))
    exp = Experiment(cfg, run_dir, final_dir, device, strategy, bundle, splits, plan, learner, train, val, test_b,
                     cached, amp=device.type == "cuda" and cfg.amp is not False, steps_per_epoch=steps,
                     checkpoint=checkpoint, progress=progress and distributed.is_main(), data=data,
                     primary_metric=dataset.metric, test_files=dataset.test_files,
                     augmented=cfg.augment != "none" and not cached)
    if cfg.mixup or cfg.cutmix:
        exp.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=len(splits.classes))
    if cfg.ema:
        exp.ema = ModelEmaV3(learner, decay=cfg.ema)
    return exp


def restore(exp: Experiment) -> Progress:
    """Where the run starts: from scratch, or from its checkpoint (weights, history, best so far)."""
    if exp.checkpoint is None:
        return Progress()
    exp.learner.load_state_dict(exp.checkpoint["model"])
    if exp.ema is not None:
        exp.ema.load_state_dict(exp.checkpoint["ema"])
    log.info(f"resuming {exp.run_dir} after epoch {exp.checkpoint['epoch'] + 1}")
    return Progress(exp.checkpoint["history"], exp.checkpoint["best"], exp.checkpoint["epoch"] + 1)


def start_phase(exp: Experiment, phase: Phase) -> PhaseState:
    """Everything that depends on which parameters train is rebuilt here, at each phase boundary:
    requires_grad, the optimizer, the schedule, the DDP wrapper and any compiled graph (a graph
    compiled before requires_grad changed would silently keep a layer frozen)."""
    cfg = exp.cfg
    if not exp.cached:
        apply_trainable(exp.model, phase.trainable)
    optimizer = build_optimizer(exp.learner, cfg, cfg.lr * phase.lr_scale, None if exp.cached else exp.bundle.head)
    total = max(1, (phase.end_epoch - phase.first_epoch) * exp.steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * exp.steps_per_epoch)) if cfg.warmup_epochs else 0
    scheduler = warmup_cosine(optimizer, total, warmup)
    scaler = torch.amp.GradScaler("cuda") if exp.amp and not torch.cuda.is_bf16_supported() else None
    forward = distributed.wrap(exp.learner, exp.device)
    if cfg.compile:
        torch._dynamo.reset()
        forward = torch.compile(forward)
    head_only = exp.bundle.head if phase.head_only(exp.bundle.head) and not exp.cached else None
    state = PhaseState(phase, forward, head_only, optimizer, scheduler, scaler)
    ckpt = exp.checkpoint
    if ckpt is not None and ckpt["phase"] == phase.index and ckpt["epoch"] + 1 > phase.first_epoch:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    return state


def train_one_epoch(exp: Experiment, state: PhaseState, epoch: int) -> dict:
    """One pass over the training split; returns the epoch's training loss, accuracy, time and images/s."""
    cfg, device = exp.cfg, exp.device
    torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout etc.: resume replays the same randomness
    order = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    aug = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch) + 1)
    set_train_mode(exp.learner, cfg.bn_frozen, state.head_only)
    t0 = time.perf_counter()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bar = tqdm(total=exp.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not exp.progress)
    batches = exp.train.iterate(cfg.batch_size, shuffle=True, augment=exp.augmented, generator=order,
                                aug_generator=aug, drop_last=True)
    np.random.seed(epoch_seed(cfg.seed, epoch) % 2**32)  # timm's Mixup draws from numpy's global generator
    for step, (x, y) in enumerate(batches):
        with autocast_for(device, exp.amp):
            if exp.mixup is not None:  # soft targets, label smoothing folded in
                x, target = exp.mixup(x, y)
                logits = state.forward(x)
                loss = SoftTargetCrossEntropy()(logits.float(), target)
            else:
                logits = state.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            loss.backward()
            state.optimizer.step()
        state.scheduler.step()
        if exp.ema is not None:
            exp.ema.update(exp.learner)
        stats[0] += loss.detach() * len(y)
        stats[1] += (logits.detach().argmax(1) == y).sum()
        stats[2] += len(y)
        bar.update(1)
        if exp.progress and (step % 10 == 9 or step == exp.steps_per_epoch - 1):  # the only host sync in the loop
            s = stats.tolist()
            bar.set_postfix(loss=f"{s[0] / s[2]:.4f}", acc=f"{s[1] / s[2]:.4f}",
                            img_s=f"{s[2] * distributed.world_size() / (time.perf_counter() - t0):.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    bar.close()
    distributed.all_reduce_sum(stats)
    loss_sum, correct, count = stats.tolist()
    if not math.isfinite(loss_sum):
        last = (f"the last good checkpoint (epoch {epoch}) is kept in {exp.run_dir}" if epoch > 0 and
                (exp.run_dir / rundir.CHECKPOINT).exists() else "no epoch completed, so no checkpoint was written")
        raise UserError(f"training loss became NaN/inf in epoch {epoch + 1}; {last}. "
                        f"Lower --lr (now {cfg.lr * state.phase.lr_scale:g}) or check the data.")
    return {"epoch": epoch + 1, "phase": state.phase.index, "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "epoch_time_s": seconds, "images_per_s": count / seconds}


def end_epoch(exp: Experiment, state: PhaseState, done: Progress, row: dict) -> None:
    """Validate, keep the best weights so far (selection on validation only), write metrics and checkpoint."""
    cfg = exp.cfg
    val_loss, val_acc = evaluate(exp.learner, exp.val, exp.eval_batch_size, exp.amp)
    row = {"epoch": row["epoch"], "phase": row["phase"], "train_loss": row["train_loss"], "train_acc": row["train_acc"],
           "val_loss": val_loss, "val_acc": val_acc, "lr": state.optimizer.param_groups[0]["lr"],
           "epoch_time_s": row["epoch_time_s"], "images_per_s": row["images_per_s"]}
    candidates = [(val_acc, False, exp.learner)]
    if exp.ema is not None:  # the EMA weights are validated and selected like the raw ones
        row["val_loss_ema"], row["val_acc_ema"] = evaluate(exp.ema.module, exp.val, exp.eval_batch_size, exp.amp)
        candidates.append((row["val_acc_ema"], True, exp.ema.module))
    done.history.append(row)
    epoch = row["epoch"]
    acc, is_ema, weights = max(candidates, key=lambda c: c[0])  # the raw weights win a tie
    if acc > done.best["val_acc"] or cfg.refit:  # refit: the last epoch is the model (val was trained on)
        done.best = {"epoch": epoch, "val_acc": acc, "ema": is_ema,
                     "state": {k: v.detach().to("cpu", copy=True) for k, v in weights.state_dict().items()}}
    exp.tracker.log_epoch(row, step=epoch)
    log.info(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
             f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s  "
             f"{row['images_per_s']:.0f} img/s" + ("  *" if done.best["epoch"] == epoch else ""))
    if distributed.is_main():
        rundir.atomic_write_jsonl(exp.run_dir / rundir.METRICS, done.history)
        rundir.atomic_torch_save({
            "epoch": epoch - 1, "phase": state.phase.index, "model": exp.learner.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "history": done.history, "best": done.best, "data": exp.data,
            "ema": exp.ema.state_dict() if exp.ema is not None else None}, exp.run_dir / rundir.CHECKPOINT)
    after_epoch(epoch)


def after_epoch(epoch: int) -> None:
    """Called once each epoch's checkpoint is on disk; tests replace it to simulate a killed run."""


def write_evaluation(run_dir: Path, logits: torch.Tensor, labels: torch.Tensor, classes: list[str], scores: dict,
                     title: str) -> None:
    """What lets anyone recompute any metric without the model: the test predictions, the confusion matrix
    (CSV and heatmap) and per-class accuracy."""
    metrics.write_predictions(run_dir / rundir.PREDICTIONS, logits, labels, classes)
    cm = metrics.confusion_matrix(logits.argmax(1), labels, len(classes))
    metrics.write_confusion_csv(run_dir / rundir.CONFUSION_CSV, cm, classes)
    plots.save_png(plots.confusion_figure(cm, classes, f"{title}: confusion matrix (test)"),
                   run_dir / rundir.CONFUSION_PNG)
    plots.save_png(plots.per_class_figure(scores["per_class_acc"], classes, f"{title}: per-class test accuracy"),
                   run_dir / rundir.PER_CLASS_PNG)


def init_head(exp: Experiment) -> None:
    """LP-FT (Kumar et al. 2022): fine-tuning starts from the validated logistic-regression head. The penalty is
    chosen on validation along the logreg path; the head is then fitted on the training split alone, so
    validation stays unseen for choosing the fine-tuning epoch."""
    head = exp.model.get_submodule(exp.bundle.head)
    if not isinstance(head, nn.Linear):
        raise UserError(f"--head-init logreg needs a linear classifier; {exp.cfg.model}'s head is a "
                        f"{type(head).__name__}")
    prep = exp.train.prep
    train, val = (cached_features(exp.bundle, s, prep, exp.cfg.model, exp.device, exp.eval_batch_size,
                                  f"features ({name})", exp.progress) for name, s in (("train", exp.splits.train),
                                                                                     ("val", exp.splits.val)))
    num_classes = len(exp.splits.classes)
    path = probes.logreg_protocol(train.images, train.labels, val.images, val.labels, val.images, val.labels,
                                  num_classes, progress=exp.progress)
    weight, bias = probes.fit_logreg(train.images, train.labels, num_classes, path["chosen_wd"],
                                     init=(path["weight"], path["bias"]))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    exp.fitted = {"head_init_wd": path["chosen_wd"]}
    log.info(f"head initialised by logistic regression (penalty {path['chosen_wd']:g} chosen on validation)")


def fit_features(exp: Experiment) -> Progress:
    """logreg / knn: the protocol on cached features of train / val / test. Its outcome is a classifier like
    any other (the head's weights, or a kNN over the training features), so the test split is scored once
    by `finish`, as for every strategy."""
    train, val, test = (b.data for b in (exp.train, exp.val, exp.test))
    num_classes = len(exp.splits.classes)
    t0 = time.perf_counter()
    if exp.strategy.kind == "logreg":
        head = exp.learner
        if not isinstance(head, nn.Linear):
            raise UserError(f"logreg needs a linear classifier to hold its result; {exp.cfg.model}'s head "
                            f"'{exp.bundle.head}' is a {type(head).__name__}")
        out = probes.logreg_protocol(train.images, train.labels, val.images, val.labels, test.images, test.labels,
                                     num_classes, progress=exp.progress)
        with torch.no_grad():
            head.weight.copy_(out["weight"])
            head.bias.copy_(out["bias"])
        chosen = {"chosen_wd": out["chosen_wd"]}
        val_acc = next(p["val_acc"] for p in out["val_curve"] if p["wd"] == out["chosen_wd"])
    else:
        out = probes.knn_protocol(train.images, train.labels, val.images, val.labels, test.images, test.labels,
                                  num_classes)
        exp.learner = probes.KNNClassifier(train.images.to(exp.device), train.labels.to(exp.device), num_classes,
                                           out["chosen_k"])
        chosen = {"chosen_k": out["chosen_k"]}
        val_acc = next(p["val_acc"] for p in out["val_curve"] if p["k"] == out["chosen_k"])
    seconds = time.perf_counter() - t0
    exp.fitted = {**chosen, "val_curve": out["val_curve"], "fit_time_s": seconds}
    log.info(f"{exp.strategy.name}: {chosen} chosen on validation (val acc {val_acc:.4f}), {seconds:.1f}s")
    history = [{"epoch": 0, "phase": 0, "train_loss": None, "train_acc": None, "val_loss": None, "val_acc": val_acc,
                "lr": 0.0, "epoch_time_s": seconds, "images_per_s": None}]
    return Progress(history, {"epoch": 0, "val_acc": val_acc, "state": exp.learner.state_dict()})


def finish(exp: Experiment, done: Progress) -> dict:
    """Test the weights selected on validation, once; write model.pt, curves.png and summary.json."""
    cfg = exp.cfg
    if done.best["state"] is None:  # zero-shot: nothing trained, the untrained head is the model
        val_loss, val_acc = evaluate(exp.learner, exp.val, exp.eval_batch_size, exp.amp)
        done.history = [{"epoch": 0, "phase": 0, "train_loss": None, "train_acc": None, "val_loss": val_loss,
                         "val_acc": val_acc, "lr": 0.0, "epoch_time_s": 0.0, "images_per_s": None}]
        done.best = {"epoch": 0, "val_acc": val_acc, "state": copy.deepcopy(exp.learner.state_dict())}
    exp.learner.load_state_dict(done.best["state"])
    logits, labels = predict(exp.learner, exp.test, exp.eval_batch_size, exp.amp)
    test_loss = F.cross_entropy(logits.double(), labels).item()
    scores = metrics.classification_metrics(logits, labels)
    test_acc = scores["top1"]
    trained = [h for h in done.history if h["train_loss"] is not None]
    fitted = exp.strategy.fits_features
    train_time = exp.fitted["fit_time_s"] if fitted else sum(h["epoch_time_s"] for h in trained)
    trainable, total = count_params(exp.model)
    classes = exp.splits.classes
    summary = {
        "test_acc": test_acc, "test_loss": test_loss, "best_val_acc": done.best["val_acc"],
        "best_epoch": done.best["epoch"], "epochs": cfg.epochs, "trainable_params": trainable, "total_params": total,
        "train_time_s": train_time,
        "images_per_s": (sum(h["images_per_s"] * h["epoch_time_s"] for h in trained) / train_time
                         if train_time and trained else None),
        "peak_memory_mb": peak_memory_mb(exp.device), "model": cfg.model, "dataset": cfg.dataset,
        "strategy": cfg.strategy, "seed": cfg.seed, "image_size": cfg.image_size, "num_classes": len(classes),
        "device": str(exp.device), "world_size": distributed.world_size(), "feature_cache": exp.cached,
        "augment": cfg.augment if exp.augmented else "none", "train_images": len(exp.splits.train),
        "ema_selected": done.best.get("ema", False),
        "val_images": len(exp.splits.val), "test_images": len(exp.splits.test), "versions": versions(),
        # The literature's figure for this dataset (mean-per-class accuracy for Pets, Flowers, ...), and the rest
        "primary_metric": exp.primary_metric, "primary_value": scores[exp.primary_metric],
        "test_top5": scores["top5"], "test_mean_per_class_acc": scores["mean_per_class_acc"],
        "test_nll": scores["nll"], "test_ece": scores["ece"], "test_per_class_acc": scores["per_class_acc"],
        "data_fingerprint": exp.data, "protocol": "refit on train+val, last epoch" if cfg.refit else
        "selected on validation",
        **(exp.fitted or {}),
    }
    if distributed.is_main():
        run_dir = exp.run_dir
        rundir.atomic_write_jsonl(run_dir / rundir.METRICS, done.history)
        if exp.strategy.kind != "knn":  # a kNN classifier is its memory bank: predictions.npz holds what it said
            rundir.atomic_torch_save({
                "format": 1, "config": cfg.to_dict(), "classes": classes,
                "data_config": exp.bundle.data_config.to_dict(), "image_size": cfg.image_size,
                "state_dict": {k: v.cpu() for k, v in exp.model.state_dict().items()}, "test_acc": test_acc},
                run_dir / rundir.MODEL)
        title = f"{cfg.name}: {cfg.model} on {cfg.dataset}"
        figure = plots.path_figure(exp.fitted["val_curve"], title) if fitted else plots.curves_figure(
            done.history, title)
        plots.save_png(figure, run_dir / rundir.CURVES)
        write_evaluation(run_dir, logits, labels, classes, scores, cfg.name)
        if exp.test_files:
            rundir.atomic_write_text(run_dir / rundir.TEST_FILES, "".join(f + "\n" for f in exp.test_files))
        rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
        (run_dir / rundir.CHECKPOINT).unlink(missing_ok=True)  # the run is complete: model.pt supersedes it
        exp.tracker.finish(summary, [run_dir / name for name in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY,
                                                                 rundir.CURVES)])
        if run_dir != exp.final_dir:  # --overwrite: the old run (every file it had) goes only now
            rundir.replace_dir(run_dir, exp.final_dir)
    log.info(f"{cfg.name}: test acc {test_acc:.4f} (best val acc {done.best['val_acc']:.4f} at epoch "
             f"{done.best['epoch']}), train time {train_time:.1f}s -> {exp.final_dir}")
    distributed.barrier()
    return summary


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        tags: dict[str, str] | None = None) -> dict:
    """Train and evaluate one experiment; returns the summary written to summary.json. `tags` go to the
    experiment trackers (--log) beside the run's name, dataset, model and strategy (a study adds its name)."""
    preflight(cfg)
    cfg = cfg.resolved()
    distributed.setup(cfg.device)
    exp = prepare(cfg, resume=resume, overwrite=overwrite, progress=progress)
    trainable, total = count_params(exp.model)
    log.info(f"{cfg.name}: {cfg.model} on {cfg.dataset} ({len(exp.splits.classes)} classes; train "
             f"{len(exp.splits.train)}, val {len(exp.splits.val)}, test {len(exp.splits.test)}), strategy "
             f"{cfg.strategy}, {cfg.image_size}px, {trainable:,} of {total:,} parameters trainable, device {exp.device}"
             + (f" x{distributed.world_size()}" if distributed.world_size() > 1 else ""))
    if distributed.is_main() and cfg.trackers():
        exp.tracker = open_trackers(cfg.trackers(), run_dir=exp.run_dir, config=cfg.to_dict(), tags={
            "run": cfg.name, "dataset": cfg.dataset, "model": cfg.model, "strategy": cfg.strategy, **(tags or {})})
    try:
        done = fit_features(exp) if exp.strategy.fits_features else restore(exp)
        if exp.cfg.head_init == "logreg" and done.start_epoch == 0:
            init_head(exp)
        for phase in exp.plan if not exp.strategy.fits_features else []:
            if phase.end_epoch <= done.start_epoch or phase.end_epoch == phase.first_epoch:
                continue
            state = start_phase(exp, phase)
            for epoch in range(max(phase.first_epoch, done.start_epoch), phase.end_epoch):
                end_epoch(exp, state, done, train_one_epoch(exp, state, epoch))
        summary = finish(exp, done)
    except BaseException as err:
        exp.tracker.close(exit_status(type(err)))
        if exp.run_dir != exp.final_dir and distributed.is_main():  # a failed --overwrite: the old run stays
            shutil.rmtree(exp.run_dir, ignore_errors=True)
        raise
    exp.tracker.close()
    return summary
