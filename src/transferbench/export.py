"""`transferbench export`: a finished run as an ONNX file, verified against PyTorch, optionally int8.

The ONNX graph takes the *normalised* float tensor (N, 3, S, S) and returns logits (N, classes), with a
dynamic batch dimension. Everything needed to feed it (size, mean, std, interpolation, class names) is
written beside it as `<file>.json`, and embedded in the file's metadata as well.

Before anything is written, the exported graph runs under onnxruntime on real test images, preprocessed
exactly as in evaluation, at two batch sizes, and is compared with the PyTorch model: a graph whose logits
differ by more than the tolerance, or whose predicted class differs, is refused (nothing at --out).

`--quantize int8` quantizes that verified float graph statically (QDQ, per-channel int8 weights, uint8
activations) with ranges calibrated on images of the run's own training split, then evaluates the float
and the int8 graph on the whole test split: accuracy, agreement, and CPU images/s of each.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
EXPORTERS = ("auto", "dynamo", "torchscript")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Verification: max |onnx - torch| over the checked logits must be <= RTOL * max(1, max |torch logits|).
RTOL = 1e-3
VERIFY_IMAGES = 32
METADATA_KEY = "transferbench.contract"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (with model.pt)")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="export format (default: onnx)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file (default RUN_DIR/model.onnx, or RUN_DIR/model.int8.onnx with --quantize int8); "
                             "the preprocessing contract and report go to FILE.json")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE,
                        help="int8: static quantization calibrated on the run's training images, then evaluated "
                             "beside the float model on the test split")
    parser.add_argument("--evaluate", action="store_true",
                        help="also evaluate the exported model on the whole test split (always on with --quantize)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default: {DEFAULT_OPSET})")
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS,
                        help="torch.onnx exporter: dynamo (torch.export based), torchscript (legacy), or auto: "
                             "dynamo, then torchscript if dynamo fails or its graph fails verification")
    parser.add_argument("--calibration-images", type=int, default=256, metavar="N",
                        help="--quantize: training images that calibrate activation ranges (default: 256)")
    parser.add_argument("--calibration", default="minmax", choices=CALIBRATION_METHODS,
                        help="--quantize: how activation ranges are chosen from the calibration images (default: minmax)")
    parser.add_argument("--reduce-range", action="store_true",
                        help="--quantize: 7-bit weights, which avoids int16 saturation on x86 CPUs without VNNI")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation and timing batch size (default: 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads for evaluation and timing (default: onnxruntime's choice)")
    parser.add_argument("--data-dir", default=None, help="where CIFAR lives, if not where the run found it")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def command(args) -> int:
    if args.format != "onnx":  # argparse already restricts it; kept for the Python-API path
        raise UserError(f"unknown --format '{args.format}'; choose one of {', '.join(FORMATS)}")
    report = export_run(args.run_dir, out=args.out, quantize=args.quantize, evaluate=args.evaluate,
                        overwrite=args.overwrite, opset=args.opset, exporter=args.exporter,
                        calibration_images=args.calibration_images, calibration=args.calibration,
                        reduce_range=args.reduce_range, batch_size=args.batch_size, threads=args.threads,
                        data_dir=args.data_dir, progress=args.progress)
    print(format_report(report))
    return 0


# ------------------------------------------------------------------------------------------- the run

@dataclass
class LoadedRun:
    run_dir: Path
    saved: dict
    cfg: Any  # RunConfig
    model: Any  # torch.nn.Module, eval mode, float32, on the CPU
    classes: list[str]
    image_size: int
    data_config: dict


def load_run(run_dir: str | Path) -> LoadedRun:
    """The fine-tuned model of a finished run, rebuilt from model.pt on the CPU."""
    import torch

    from . import rundir
    from .config import RunConfig
    from .models import create_model

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
    missing = [k for k in ("config", "classes", "data_config", "image_size", "state_dict") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{path} is not a transferbench model file (missing: {', '.join(missing)})")
    cfg = RunConfig.from_dict(saved["config"], source=str(path))
    classes = list(saved["classes"])
    bundle = create_model(cfg.model, len(classes))
    try:
        bundle.model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: the saved weights do not fit model '{cfg.model}' ({err})") from None
    model = bundle.model.float().eval()
    return LoadedRun(run_dir, saved, cfg, model, classes, int(saved["image_size"]), dict(saved["data_config"]))


def _splits(run: LoadedRun, data_dir: str | None):
    """The run's own splits (same seed, validation fraction and subset), so calibration never sees test images."""
    from .data import load_dataset, make_splits

    cfg = run.cfg
    train, test = load_dataset(cfg.dataset, data_dir or cfg.data_dir, storage_size=run.image_size, workers=cfg.workers)
    if list(test.classes) != run.classes:
        raise UserError(f"the test split of {cfg.dataset} now has classes {test.classes}, the run was trained on {run.classes}")
    return make_splits(train, test, val_fraction=cfg.val_fraction, train_subset=cfg.train_subset, seed=cfg.seed)


def _preprocess(run: LoadedRun):
    import torch

    from .data import Preprocess

    dc = run.data_config
    return Preprocess(run.image_size, dc["mean"], dc["std"], dc["interpolation"], torch.device("cpu"), channels_last=False)


def _prepared(prep, images) -> "np.ndarray":  # noqa: F821
    """uint8 (N, 3, H, W) -> the graph's input: float32, NCHW, C-contiguous, normalised."""
    import numpy as np

    return np.ascontiguousarray(prep(images).float().numpy(), dtype=np.float32)


def contract(run: LoadedRun) -> dict:
    """How to feed the exported graph and read its output."""
    dc, size = run.data_config, run.image_size
    return {
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size],
            "size": size, "color": "RGB", "interpolation": dc["interpolation"],
            "mean": list(dc["mean"]), "std": list(dc["std"]),
            "normalisation": "RGB values scaled to [0, 1], then (x - mean) / std per channel",
            "resize": f"whole image resized to {size}x{size} ({dc['interpolation']}, antialiased when shrinking), as in "
                      f"training; folders of mixed image sizes were first resized on the shorter side and centre-cropped",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(run.classes)],
                   "meaning": "logits, one per class in `classes` order (softmax gives probabilities)"},
        "classes": run.classes,
    }


# ----------------------------------------------------------------------------------------- exporting

def _export(model, example, path: Path, opset: int, exporter: str) -> None:
    """torch.onnx.export with a dynamic batch dimension, the chosen exporter named explicitly."""
    import torch

    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)


def _set_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_batches(session, x, batch_size: int):
    import numpy as np

    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def compare(session, x, reference, batch_sizes: tuple[int, ...]) -> dict:
    """Run the graph on x at each batch size and compare its logits with the reference logits."""
    import numpy as np

    tol = RTOL * max(1.0, float(np.abs(reference).max()))
    top = reference.argmax(1)
    worst, flips = 0.0, 0
    for bs in batch_sizes:
        out = _run_batches(session, x, bs)
        if out.shape != reference.shape:
            raise UserError(f"the ONNX graph returned shape {tuple(out.shape)} at batch size {bs}, expected {tuple(reference.shape)}")
        diff = float(np.abs(out.astype(np.float64) - reference).max()) if np.isfinite(out).all() else float("inf")
        worst = max(worst, diff)
        # A changed prediction counts unless PyTorch itself had a near tie (top-2 margin within the tolerance).
        pick = out.argmax(1)
        margin = reference[np.arange(len(top)), top] - reference[np.arange(len(top)), pick]
        flips = max(flips, int(((pick != top) & (margin > tol)).sum()))
    return {"images": len(x), "batch_sizes": list(batch_sizes), "max_abs_diff": worst, "tolerance": tol,
            "argmax_differs": flips, "passed": bool(worst <= tol and flips == 0)}


def _verification_inputs(run: LoadedRun, test, prep):
    """Up to VERIFY_IMAGES test images spread over the split (every class when sorted by class), at least 2."""
    import numpy as np
    import torch

    n = len(test)
    idx = np.unique(np.linspace(0, n - 1, min(n, VERIFY_IMAGES)).round().astype(int))
    if len(idx) < 2:
        idx = np.repeat(idx, 2)
    x = _prepared(prep, test.images[torch.as_tensor(idx)])
    with torch.inference_mode():
        reference = run.model(torch.from_numpy(x)).double().numpy()
    return x, reference


def export_verified(run: LoadedRun, x, reference, path: Path, opset: int, exporter: str, meta: dict) -> tuple[str, dict]:
    """Export to path and verify it; returns (exporter used, verification). Raises UserError if no exporter passes."""
    import torch

    order = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
    example = torch.from_numpy(x[:2].copy())
    failures = []
    for name in order:
        path.unlink(missing_ok=True)
        try:
            _export(run.model, example, path, opset, name)
            _set_metadata(path, meta)
            session = _session(path)
        except UserError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failures.append(f"{name} exporter failed ({type(err).__name__}: {first[:300]})")
            continue
        check = compare(session, x, reference, (len(x), 1))
        if check["passed"]:
            return name, check
        failures.append(f"{name} exporter: ONNX logits differ from PyTorch by up to {check['max_abs_diff']:.3g} "
                        f"(tolerance {check['tolerance']:.3g}); the predicted class differs on {check['argmax_differs']} "
                        f"of {check['images']} test images")
    raise UserError("refusing to export: " + "; ".join(failures))


# -------------------------------------------------------------------------------------- quantization

def _calibration_reader(images, prep, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(images):
                return None
            x = _prepared(prep, images[self.start:self.start + batch_size])
            self.start += batch_size
            return {INPUT_NAME: x}

        def rewind(self):
            self.start = 0

    return Reader()


def quantize_int8(float_path: Path, out_path: Path, calibration, prep, work: Path, *, method: str,
                  reduce_range: bool) -> dict:
    """Static QDQ quantization of a float ONNX graph, ranges calibrated on `calibration` (uint8 images)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = float_path
    pre = work / "preprocessed.onnx"
    try:  # shape inference + graph optimisation (BatchNorm folding etc.): what onnxruntime recommends before quantizing
        quant_pre_process(str(float_path), str(pre))
        source, preprocessed = pre, True
    except Exception as err:
        print(f"warning: onnxruntime quant_pre_process failed ({type(err).__name__}: {err}); quantizing the graph as exported",
              file=sys.stderr)
        preprocessed = False
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    t0 = time.perf_counter()
    quantize_static(str(source), str(out_path), _calibration_reader(calibration.images, prep, 32),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                    extra_options={"CalibMaxIntermediateOutputs": 4})
    return {"method": "static", "format": "QDQ", "weights": "int8, per channel" + (", 7-bit range" if reduce_range else ""),
            "activations": "uint8, per tensor", "calibration": method, "calibration_images": len(calibration),
            "calibration_source": "the run's training split (its own seed, --val-fraction and --train-subset); "
                                  "no validation or test image", "pre_process": preprocessed,
            "quantize_time_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------- evaluation

def evaluate_sessions(sessions: dict, test, prep, batch_size: int, progress: bool) -> dict:
    """Accuracy and images/s of each session over the whole test split, batch by batch in turn (so a busy
    machine slows them alike); only session.run is timed, after a warmup on the first batch."""
    import numpy as np

    labels = test.labels.numpy()
    starts = range(0, len(test), batch_size)
    first = _prepared(prep, test.images[:batch_size])
    for s in sessions.values():
        for _ in range(2):
            s.run([OUTPUT_NAME], {INPUT_NAME: first})
    preds = {k: [] for k in sessions}
    times = {k: 0.0 for k in sessions}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(starts), desc="evaluating", leave=False, file=sys.stderr)
    for i in starts:
        x = _prepared(prep, test.images[i:i + batch_size])
        for k, s in sessions.items():
            t0 = time.perf_counter()
            out = s.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            times[k] += time.perf_counter() - t0
            preds[k].append(out.argmax(1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = {}
    for k in sessions:
        p = np.concatenate(preds[k])
        result[k] = {"test_acc": float((p == labels).mean()), "images_per_s": len(labels) / times[k] if times[k] else None,
                     "predictions": p}
    return result


# ------------------------------------------------------------------------------------------ the verb

def default_out(run_dir: Path, quantize: str | None) -> Path:
    return run_dir / ("model.int8.onnx" if quantize == "int8" else "model.onnx")


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_run(run_dir: str | Path, *, out: str | Path | None = None, quantize: str | None = None, evaluate: bool = False,
               overwrite: bool = False, opset: int = DEFAULT_OPSET, exporter: str = "auto", calibration_images: int = 256,
               calibration: str = "minmax", reduce_range: bool = False, batch_size: int = 64, threads: int | None = None,
               data_dir: str | None = None, progress: bool = True) -> dict:
    """Export a finished run to a verified ONNX file (int8 with quantize="int8"); returns the report written beside it."""
    checks = [
        (quantize in (None, *QUANTIZE), f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZE)}"),
        (exporter in EXPORTERS, f"unknown --exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}"),
        (calibration in CALIBRATION_METHODS, f"unknown --calibration '{calibration}'; choose one of {', '.join(CALIBRATION_METHODS)}"),
        (opset >= 17, f"--opset must be >= 17, got {opset}"),
        (calibration_images >= 1, f"--calibration-images must be >= 1, got {calibration_images}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (threads is None or threads >= 1, f"--threads must be >= 1, got {threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(f"export needs onnx and onnxruntime ({err}); install them with: pip install 'transferbench[export]'") from None

    run_dir = Path(run_dir).expanduser()
    out = Path(out).expanduser() if out else default_out(run_dir, quantize)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out to choose another file")
    run = load_run(run_dir)
    splits = _splits(run, data_dir)
    prep = _preprocess(run)
    x, reference = _verification_inputs(run, splits.test, prep)

    info = {
        "format": "onnx", "file": out.name, "precision": "int8" if quantize else "float32",
        **contract(run),
        "source": {"run_dir": str(run_dir.resolve()), "model": run.cfg.model, "dataset": run.cfg.dataset,
                   "strategy": run.cfg.strategy, "seed": run.cfg.seed, "recorded_test_acc": run.saved.get("test_acc")},
    }
    meta = {METADATA_KEY: json.dumps({k: info[k] for k in ("input", "output", "classes")}),
            "classes": json.dumps(run.classes)}

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        float_path = work / "model.onnx"
        used, verification = export_verified(run, x, reference, float_path, opset, exporter, meta)
        info["export"] = {"exporter": used, "opset": opset, "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]}, **_versions()}
        info["verification"] = {"against": "the PyTorch model of model.pt, on test images preprocessed as in evaluation",
                                **verification}
        final = float_path
        sessions = {"float32": _session(float_path, threads)}
        if quantize == "int8":
            from .data import stratified_subset

            train = splits.train
            calib = train.subset(stratified_subset(train.labels, min(calibration_images, len(train)), run.cfg.seed))
            int8_path = work / "model.int8.onnx"
            try:
                info["quantization"] = quantize_int8(float_path, int8_path, calib, prep, work, method=calibration,
                                                     reduce_range=reduce_range)
                _set_metadata(int8_path, meta)
                int8_session = _session(int8_path)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"refusing to export: int8 quantization failed ({type(err).__name__}: {err})") from None
            check = compare(int8_session, x, reference, (len(x), 1))
            if check["max_abs_diff"] == float("inf"):
                raise UserError("refusing to export: the int8 graph returns non-finite logits on test images")
            # Quantization changes logits by design: reported, not enforced. Batch-size independence is enforced.
            consistency = compare(int8_session, x, _run_batches(int8_session, x, len(x)).astype("float64"), (1,))
            if not consistency["passed"]:
                raise UserError(f"refusing to export: the int8 graph's logits depend on the batch size (up to "
                                f"{consistency['max_abs_diff']:.3g} apart at batch sizes {len(x)} and 1)")
            info["int8_vs_pytorch"] = {k: check[k] for k in ("images", "batch_sizes", "max_abs_diff")}
            info["int8_vs_pytorch"]["argmax_differs"] = check["argmax_differs"]
            sessions["int8"] = _session(int8_path, threads)
            final = int8_path
        if quantize or evaluate:
            results = evaluate_sessions(sessions, splits.test, prep, batch_size, progress)
            evaluation = {"test_images": len(splits.test), "batch_size": batch_size,
                          "threads": threads or "onnxruntime default", "cpu_count": os.cpu_count(),
                          "machine": platform.machine(), "processor": _cpu_name(),
                          "pytorch_recorded_test_acc": run.saved.get("test_acc")}
            for k, r in results.items():
                evaluation[k] = {"test_acc": r["test_acc"], "images_per_s": r["images_per_s"]}
            evaluation["float32"]["size_mb"] = float_path.stat().st_size / 2**20
            if "int8" in results:
                evaluation["int8"]["size_mb"] = final.stat().st_size / 2**20
                evaluation["int8_float32_agreement"] = float((results["int8"]["predictions"] == results["float32"]["predictions"]).mean())
                evaluation["int8_speedup"] = (results["int8"]["images_per_s"] / results["float32"]["images_per_s"]
                                              if results["int8"]["images_per_s"] and results["float32"]["images_per_s"] else None)
            info["evaluation"] = evaluation
        del sessions
        info["sha256"] = _sha256(final)
        info["size_bytes"] = final.stat().st_size
        from .rundir import atomic_write_json

        # The contract first, then the model: whenever the new model file exists, its contract is beside it.
        atomic_write_json(report_path(out), info)
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["out"] = str(out)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_report(info: dict) -> str:
    v = info["verification"]
    lines = [
        f"verified against PyTorch on {v['images']} test images at batch sizes {v['batch_sizes'][0]} and {v['batch_sizes'][1]}: "
        f"max |onnx - torch| = {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}), predicted class identical "
        f"({info['export']['exporter']} exporter, opset {info['export']['opset']})",
    ]
    if "int8_vs_pytorch" in info:
        q = info["int8_vs_pytorch"]
        lines.append(f"int8 vs PyTorch on the same images: max |int8 - torch| = {q['max_abs_diff']:.3g}, "
                     f"predicted class differs on {q['argmax_differs']} of {q['images']}")
    ev = info.get("evaluation")
    if ev:
        lines.append(f"test split, {ev['test_images']} images, batch {ev['batch_size']}, onnxruntime CPU "
                     f"({ev['cpu_count']} cores, threads: {ev['threads']}):")
        lines.append(f"  {'model':<10} {'test acc':>9} {'images/s':>10} {'size MB':>8}")
        recorded = ev.get("pytorch_recorded_test_acc")
        if recorded is not None:
            lines.append(f"  {'pytorch':<10} {recorded:>9.4f} {'-':>10} {'-':>8}")
        for k in ("float32", "int8"):
            if k in ev:
                r = ev[k]
                ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
                lines.append(f"  {k:<10} {r['test_acc']:>9.4f} {ips:>10} {r['size_mb']:>8.2f}")
        if "int8_float32_agreement" in ev:
            sp = ev.get("int8_speedup")
            lines.append(f"  int8 predicts the float model's class on {ev['int8_float32_agreement']:.2%} of test images"
                         + (f"; {sp:.2f}x the float images/s" if sp else ""))
    lines.append(f"wrote {info['out']} and {report_path(Path(info['out'])).name}")
    return "\n".join(lines)
