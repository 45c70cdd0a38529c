"""Which backbone? Rank candidate models for a dataset before fine-tuning any of them.

`rank` scores every candidate with transferability estimators (LogME, shrinkage H-score: see
`transferability`) on its frozen features of the training split, and times each step. The features come
from the same cache the linear probe uses (`features.cached_features`), built exactly as `transferbench run
--strategy linear-probe --no-augment` builds them with the same options: the same split (`make_splits` with
the run's seed, validation fraction and training subset), the same preprocessing (the weights' data config at
the run's image size) and the same model name, weights and images in the content-hashed key. Ranking then
probing, or probing then ranking, extracts the training features once.

A model that cannot be built, loaded or scored is a failed row (with its error) and the others still rank;
a problem with the data or the options stops everything before any model is built.

    ranking = rank(RunConfig(dataset="folder:data/pets", image_size=160, train_subset=5000),
                   ["resnet50", "tf_efficientnet_lite0"], weights={"tf_efficientnet_lite0": "lite0.pth"})
    print(ranking.table())
    ranking.write(Path("runs/rank-pets"))       # rank.json and rank.csv, each written atomically
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import rundir
from .config import DatasetSpec, RunConfig, cache_dir, slug
from .data import Splits, check_dataset
from .errors import UserError, did_you_mean
from .features import cached_features, feature_key
from .host import pick_device, versions
from .models import data_config
from .preprocess import Preprocess
from .training import build_model, load_splits
from .transferability import ESTIMATORS, score

log = logging.getLogger(__name__)

DEFAULT_ESTIMATORS = ("logme", "hscore")
FORMAT = 1


def parse_models(text: str | Iterable[str]) -> list[str]:
    """'a,b, c' (or a list of such strings) -> ['a', 'b', 'c']; empty names and repeats are errors."""
    parts = [text] if isinstance(text, str) else list(text)
    models = [m.strip() for part in parts for m in part.split(",")]
    if not any(models):
        raise UserError("--models is empty: give the candidate models, comma-separated, e.g. "
                        "--models resnet50,tf_efficientnet_lite0")
    if not all(models):
        raise UserError(f"--models {','.join(parts)}: an empty name between commas")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise UserError(f"--models lists {', '.join(repeated)} more than once")
    return models


def parse_weights(items: Iterable[str] | None, models: Sequence[str]) -> dict[str, str]:
    """['MODEL=FILE', ...] -> {MODEL: FILE}; every MODEL must be one of `models`."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UserError(f"--weights {item!r}: expected MODEL=FILE, e.g. --weights resnet50=~/weights/r50.pth "
                            f"(one --weights per model)")
        if name not in models:
            raise UserError(f"--weights {item}: '{name}' is not one of --models ({', '.join(models)})."
                            f"{did_you_mean(name, models)}")
        if name in out:
            raise UserError(f"--weights: two files for '{name}' ({out[name]}, {path})")
        out[name] = path
    return out


def parse_estimators(text: str | Iterable[str]) -> list[str]:
    """'logme,hscore' -> ['logme', 'hscore'] (the first sorts the table); unknown names are errors."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UserError(f"--estimators is empty: choose from {', '.join(ESTIMATORS)}")
    for n in names:
        if n not in ESTIMATORS:
            raise UserError(f"unknown transferability estimator '{n}': choose from {', '.join(ESTIMATORS)}."
                            f"{did_you_mean(n, ESTIMATORS)}")
    return names


# ------------------------------------------------------------------------------------------ results

@dataclass
class RankRow:
    """One candidate: its scores and what they cost, or why it has none."""

    model: str
    weights: str | None = None  # the local state dict, as an absolute path
    pretrained: bool | None = None  # weights loaded the library's standard way (download)
    status: str = "ok"  # "ok" or "failed"
    stage: str | None = None  # where it failed: "config", "build", "features" or "score"
    error: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    ranks: dict[str, int | None] = field(default_factory=dict)  # 1 = best, per estimator, among the scored
    params: int | None = None  # parameters of the network as built (new head included), as `run` counts them
    backbone_params: int | None = None  # without the head
    feature_dim: int | None = None
    image_size: int | None = None
    train_images: int | None = None
    feature_cache_hit: bool | None = None  # the training features were already in the cache
    feature_file: str | None = None
    build_time_s: float | None = None  # model built, weights loaded, input size checked
    feature_time_s: float | None = None  # extraction (or reading the cache)
    score_time_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def total_score_time_s(self) -> float | None:
        return sum(self.score_time_s.values()) if self.score_time_s else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Ranking:
    dataset: str  # canonical (folders by absolute path)
    estimators: list[str]  # the first sorts the rows
    rows: list[RankRow]  # best first by estimators[0]; failed rows last, in the order given
    options: dict[str, Any]  # what decides the features: image size, split, seed, ...
    device: str
    data_time_s: float  # loading the data and making the splits, for every image size needed
    total_time_s: float
    created: str

    @property
    def ranked(self) -> list[RankRow]:
        return [r for r in self.rows if r.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "dataset": self.dataset, "estimators": self.estimators,
                "sort_by": self.estimators[0], "options": self.options, "device": self.device,
                "data_time_s": self.data_time_s, "total_time_s": self.total_time_s, "created": self.created,
                "versions": versions(), "rows": [r.to_dict() for r in self.rows]}

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        est = self.estimators
        writer.writerow(["rank", "model", "status", *est, *(f"{e}_rank" for e in est), "params", "backbone_params",
                         "feature_dim", "image_size", "train_images", "feature_cache_hit", "build_time_s",
                         "feature_time_s", *(f"{e}_time_s" for e in est), "weights", "stage", "error"])
        for r in self.rows:
            writer.writerow([_blank(r.ranks.get(est[0])), r.model, r.status, *(_blank(r.scores.get(e)) for e in est),
                             *(_blank(r.ranks.get(e)) for e in est), _blank(r.params), _blank(r.backbone_params),
                             _blank(r.feature_dim), _blank(r.image_size), _blank(r.train_images),
                             _blank(r.feature_cache_hit), _blank(r.build_time_s), _blank(r.feature_time_s),
                             *(_blank(r.score_time_s.get(e)) for e in est), _blank(r.weights), _blank(r.stage),
                             _blank(r.error)])
        return buf.getvalue()

    def table(self) -> str:
        """The ranking for people: best first by the first estimator; failed models last, with their error."""
        est = self.estimators
        head = ["rank", "model", *est, "params", "dim", "px", "features", "scoring"]
        lines = [head]
        for r in self.rows:
            if not r.ok:
                continue
            feat = "-" if r.feature_time_s is None else f"{r.feature_time_s:.1f}s" + (" (cached)" if
                                                                                        r.feature_cache_hit else "")
            lines.append([str(r.ranks.get(est[0]) or "-"), r.model, *(_fmt_score(r.scores.get(e)) for e in est),
                          _fmt_params(r.params), str(r.feature_dim), str(r.image_size), feat,
                          f"{r.total_score_time_s:.2f}s"])
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        right = {0, *range(2, len(head))}
        text = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                .rstrip() for line in lines]
        for r in self.rows:
            if not r.ok:
                name = r.model.ljust(widths[1])
                text.append(f"{'-'.rjust(widths[0])}  {name}  FAILED ({r.stage}): {r.error}")
        return "\n".join(text)

    def summary_line(self) -> str:
        failed = len(self.rows) - len(self.ranked)
        extracted = sum(r.feature_time_s or 0.0 for r in self.ranked if not r.feature_cache_hit)
        scoring = sum(r.total_score_time_s or 0.0 for r in self.ranked)
        return (f"ranked {len(self.ranked)} of {len(self.rows)} models by {self.estimators[0]}"
                + (f" ({failed} failed)" if failed else "")
                + f" in {self.total_time_s:.1f}s: data {self.data_time_s:.1f}s, feature extraction {extracted:.1f}s, "
                  f"scoring {scoring:.2f}s")

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """rank.json and rank.csv in out_dir, each written atomically."""
        out_dir = rundir.writable_dir(Path(out_dir), "--out")
        rundir.atomic_write_json(out_dir / rundir.RANK_JSON, _finite(self.to_dict()))
        rundir.atomic_write_text(out_dir / rundir.RANK_CSV, self.csv_text())
        return out_dir / rundir.RANK_JSON, out_dir / rundir.RANK_CSV


def _blank(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    return v


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt_score(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def default_out_dir(dataset: str, output_dir: str | Path = "runs", now: datetime | None = None) -> Path:
    """OUTPUT_DIR/rank-<dataset>-<YYYYmmdd-HHMMSS>: a new directory per ranking, never one that exists."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(output_dir).expanduser() / f"rank-{slug(DatasetSpec.parse(dataset).short_name())}-{stamp}"


# ------------------------------------------------------------------------------------------ ranking

def model_config(base: RunConfig, model: str, weights: str | None) -> RunConfig:
    """The configuration of the linear probe whose training features ranking `model` scores: the base's data,
    split and preprocessing options, this model and its weights, strategy linear-probe without augmentation."""
    return dataclasses.replace(base, model=model, weights=weights, pretrained=None if weights else base.pretrained,
                               strategy="linear-probe", augment="none", feature_cache=None, name=None)


def _error_text(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if not isinstance(err, UserError) else text


def rank(base: RunConfig, models: Sequence[str], *, weights: Mapping[str, str] | None = None,
         estimators: Sequence[str] = DEFAULT_ESTIMATORS, progress: bool = True) -> Ranking:
    """Score each of `models` on the training split that `base` (a RunConfig: dataset, image_size, train_subset,
    val_fraction, seed, device, batch_size, ...) defines. `weights`: a local state dict per model name (the
    others load pretrained weights the library's way unless base.pretrained is False). Failures of one model
    are rows; bad options or data raise UserError before any model is built."""
    t_start = time.perf_counter()
    models = parse_models(list(models))
    estimators = parse_estimators(list(estimators))
    weights = dict(weights or {})
    unknown = [m for m in weights if m not in models]
    if unknown:
        raise UserError(f"--weights for '{unknown[0]}', which is not one of --models ({', '.join(models)})."
                        f"{did_you_mean(unknown[0], models)}")
    probe = model_config(base, models[0], None)
    probe.pretrained = False  # the shared options alone: no model's weights are checked here
    probe.validate()
    check_dataset(probe.dataset)
    device = pick_device(base.device)
    data: dict[int, Splits] = {}  # by image size (the size the images are stored at)
    data_time = 0.0
    rows: list[RankRow] = []
    for name in models:
        row = RankRow(name, weights=str(Path(weights[name]).expanduser().resolve()) if name in weights else None)
        rows.append(row)
        try:
            cfg = model_config(base, name, weights.get(name)).resolved()
            row.pretrained = bool(cfg.pretrained)
            preprocessing = data_config(cfg.model)
        except Exception as err:
            _fail(row, "config", err)
            continue
        cfg.image_size = cfg.image_size or preprocessing.input_size
        row.image_size = cfg.image_size
        if cfg.image_size not in data:  # a data problem concerns every model: it stops the ranking
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)  # as prepare() seeds before loading
            data[cfg.image_size] = load_splits(cfg, progress)[1]
            data_time += time.perf_counter() - t0
        splits = data[cfg.image_size]
        row.train_images = len(splits.train)
        if not cfg.pretrained and not cfg.weights:
            log.warning(f"{name}: no pretrained weights (--weights {name}=FILE, or leave out --no-pretrained): "
                        f"scoring a randomly initialised network")
        _score_model(row, cfg, preprocessing, splits, device, estimators, progress)
    _assign_ranks(rows, estimators)
    order = {id(r): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (not r.ok, -(r.scores.get(estimators[0]) if r.ok else 0.0), order[id(r)]))
    options = {k: getattr(base, k) for k in ("image_size", "train_subset", "shots", "val_fraction", "test_fraction",
                                             "refit", "seed", "pretrained", "batch_size", "channels_last", "data_dir",
                                             "image_column", "label_column")}
    return Ranking(dataset=probe.resolved().dataset, estimators=estimators, rows=rows, options=options,
                   device=str(device), data_time_s=data_time, total_time_s=time.perf_counter() - t_start,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _fail(row: RankRow, stage: str, err: BaseException) -> None:
    row.status, row.stage, row.error = "failed", stage, _error_text(err)
    first = row.error.splitlines()[0] if row.error else ""
    log.warning(f"{row.model}: {stage} failed: " + (first if len(first) <= 160 else first[:157] + "..."))


def _score_model(row: RankRow, cfg: RunConfig, preprocessing, splits: Splits, device: torch.device,
                 estimators: list[str], progress: bool) -> None:
    """Build the model as `training.prepare` does, get its training features from the cache (extracting them
    if absent), and score them; any failure is recorded in the row."""
    t0 = time.perf_counter()
    try:
        torch.manual_seed(cfg.seed)  # as a run seeds before building: a randomly initialised backbone is the same
        bundle = build_model(cfg, len(splits.classes), device)
    except Exception as err:
        _fail(row, "build", err)
        return
    row.build_time_s = time.perf_counter() - t0
    row.params = sum(p.numel() for p in bundle.model.parameters())
    head = bundle.model.get_submodule(bundle.head)
    row.backbone_params = row.params - sum(p.numel() for p in head.parameters())
    prep = Preprocess.build(preprocessing, cfg.image_size, device, cfg.channels_last)
    try:
        path = cache_dir() / "features" / f"{feature_key(bundle, prep, cfg.model, splits.train)}.pt"
        row.feature_cache_hit, row.feature_file = path.is_file(), str(path)
        t0 = time.perf_counter()
        feats = cached_features(bundle, splits.train, prep, cfg.model, device, cfg.batch_size * 2,
                                f"features ({row.model}, train)", progress)
        row.feature_time_s = time.perf_counter() - t0
    except UserError:
        raise  # the cache directory is not writable, say: every model would fail the same way
    except Exception as err:
        _fail(row, "features", err)
        return
    finally:
        del bundle
    x, y = feats.images, feats.labels
    row.feature_dim = int(x.shape[1])
    with one_blas_thread():
        _score_features(row, x, y, estimators)


def one_blas_thread():
    """numpy's BLAS limited to one thread while the estimators run, where threadpoolctl is installed (it comes
    with scikit-learn). Their eigendecompositions (D x D, D ~ 1000-2000) take well under a second on one core,
    but OpenBLAS's spinning threads can make one take 10-20 s on a machine whose cores are busy with other work:
    measured on the shared 2-core CPU, scoring four 5,000 x 1,280 feature sets took 75.6 s with its default two
    threads and 3.8 s with one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _score_features(row: RankRow, x: torch.Tensor, y: torch.Tensor, estimators: list[str]) -> None:
    for est in estimators:
        t0 = time.perf_counter()
        try:
            value = score(est, x, y)
            if not math.isfinite(value):
                raise UserError(f"the score is {value} (the features may be constant)")
            row.scores[est] = value
        except Exception as err:
            row.scores[est] = None
            _fail(row, "score", UserError(f"{est}: {_error_text(err)}"))
            return
        finally:
            row.score_time_s[est] = time.perf_counter() - t0
    log.info(f"{row.model}: {len(x)} x {row.feature_dim} features in {row.feature_time_s:.1f}s"
             + (" (cached)" if row.feature_cache_hit else "") + ", "
             + ", ".join(f"{e} {row.scores[e]:.4f} ({row.score_time_s[e]:.2f}s)" for e in estimators))


def _assign_ranks(rows: list[RankRow], estimators: list[str]) -> None:
    for est in estimators:
        scored = [r for r in rows if r.ok and r.scores.get(est) is not None]
        for i, r in enumerate(sorted(scored, key=lambda r: -r.scores[est])):
            r.ranks[est] = i + 1
        for r in rows:
            r.ranks.setdefault(est, None)
