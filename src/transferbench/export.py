"""`transferbench export`: a finished run as an ONNX file, verified against PyTorch, optionally int8.

The ONNX graph takes the *normalised* float tensor (N, 3, S, S) and returns logits (N, classes), with a
dynamic batch dimension. What is needed to feed it (size, mean, std, interpolation, class names) is
written beside it as `<file>.json` and embedded in the file's metadata.

Before anything is written, the graph runs under onnxruntime on real test images, preprocessed exactly
as in evaluation, at two batch sizes, and is compared with the PyTorch model: a graph whose logits differ
by more than the tolerance, or whose predicted class differs, is refused and nothing appears at --out.

`--quantize int8` quantizes that verified float graph statically (QDQ: per-channel int8 weights in a 7-bit
range, uint8 activations) with ranges calibrated on images of the run's own training split, then evaluates the float
and the int8 graph on the whole test split: accuracy, agreement, and CPU images/s of each.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import rundir
from .data import stratified_subset
from .errors import UserError
from .finished import FinishedRun, load_finished_run
from .host import cpu_name
from .preprocess import Preprocess
from .rundir import file_digest

# onnx, onnxruntime and onnxscript are an optional extra (transferbench[export]): imported where used.

FORMATS = ("onnx",)
QUANTIZE = ("int8",)
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
RTOL = 1e-3  # verification: max |onnx - torch| <= RTOL * max(1, max |torch logits|)
VERIFY_IMAGES = 32
METADATA_KEY = "transferbench.contract"


# ------------------------------------------------------------------------------------------- the run

def load_run(run_dir: str | Path) -> FinishedRun:
    """The fine-tuned model of a finished run, rebuilt from model.pt on the CPU, float32, in eval mode."""
    run = load_finished_run(run_dir)
    run.model.float().eval()
    return run


def _preprocess(run: FinishedRun) -> Preprocess:
    return run.preprocess(torch.device("cpu"), channels_last=False)


def _prepared(prep, images):
    """uint8 (N, 3, H, W) -> the graph's input: float32 NCHW, C-contiguous, normalised, as a numpy array."""
    return np.ascontiguousarray(prep(images).numpy(), dtype=np.float32)


def contract(run: FinishedRun) -> dict:
    """How to feed the exported graph and read its output."""
    dc, size = run.data_config, run.image_size
    return {
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size],
            "size": size, "color": "RGB", "interpolation": dc.interpolation,
            "mean": list(dc.mean), "std": list(dc.std),
            "normalisation": "RGB values scaled to [0, 1], then (x - mean) / std per channel",
            "resize": f"whole image resized to {size}x{size} ({dc.interpolation}, antialiased when shrinking), as in "
                      f"training; folders of mixed image sizes were first resized on the shorter side and "
                      f"centre-cropped",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(run.classes)],
                   "meaning": "logits, one per class in `classes` order (softmax gives probabilities)"},
        "classes": run.classes,
    }


# -------------------------------------------------------------------------------- export and verify

def _export(model, example, path: Path, exporter: str) -> None:
    """torch.onnx.export with a dynamic batch dimension."""
    if exporter == "dynamo":
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False, verbose=False)
    else:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and says so
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def _set_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_batches(session, x, batch_size: int):
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def compare(session, x, reference, batch_sizes: tuple[int, ...]) -> dict:
    """Run the graph on x at each batch size and compare its logits with the reference (PyTorch) logits."""
    tol = RTOL * max(1.0, float(np.abs(reference).max()))
    top = reference.argmax(1)
    rows = np.arange(len(top))
    worst, flips = 0.0, 0
    for bs in batch_sizes:
        out = _run_batches(session, x, bs)
        if out.shape != reference.shape:
            return {"passed": False, "problem": f"returned shape {tuple(out.shape)} at batch size {bs}, "
                                                f"expected {tuple(reference.shape)}"}
        worst = max(worst, float(np.abs(out - reference).max()) if np.isfinite(out).all() else float("inf"))
        # A changed prediction counts unless PyTorch itself had a near tie (top-2 margin within the tolerance).
        pick = out.argmax(1)
        flips = max(flips, int(((pick != top) & (reference[rows, top] - reference[rows, pick] > tol)).sum()))
    passed = worst <= tol and flips == 0
    result = {"images": len(x), "batch_sizes": list(batch_sizes), "max_abs_diff": worst, "tolerance": tol,
              "argmax_differs": flips, "passed": passed}
    if not passed:
        result["problem"] = (f"logits differ from PyTorch by up to {worst:.3g} (tolerance {tol:.3g}); the predicted "
                             f"class differs on {flips} of {len(x)} test images")
    return result


def _verification_inputs(run: FinishedRun, test, prep):
    """Up to VERIFY_IMAGES test images spread over the split (so every class, as splits are sorted by class)."""
    idx = np.unique(np.linspace(0, len(test) - 1, min(len(test), VERIFY_IMAGES)).round().astype(int))
    x = _prepared(prep, test.images[torch.as_tensor(idx)])
    with torch.inference_mode():
        reference = run.model(torch.from_numpy(x)).numpy()
    return x, reference


def export_verified(run: FinishedRun, x, reference, path: Path, meta: dict) -> tuple[str, dict]:
    """Export to path and verify it at two batch sizes: the dynamo exporter, else the TorchScript one.
    Returns (exporter, verification); raises UserError when neither gives a graph that passes."""
    example = torch.from_numpy(x[:2].copy())
    failures = []
    for exporter in ("dynamo", "torchscript"):
        path.unlink(missing_ok=True)
        try:
            _export(run.model, example, path, exporter)
            _set_metadata(path, meta)
            check = compare(_session(path), x, reference, (len(x), 1))
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            failures.append(f"the {exporter} exporter failed ({type(err).__name__}: {first[:300]})")
            continue
        if check["passed"]:
            return exporter, check
        failures.append(f"the {exporter} exporter's graph {check['problem']}")
    path.unlink(missing_ok=True)
    raise UserError("refusing to export: " + "; ".join(failures))


# -------------------------------------------------------------------------------------- quantization

def quantize_int8(float_path: Path, out_path: Path, calibration, prep, work: Path) -> dict:
    """Static QDQ quantization of a float ONNX graph, activation ranges calibrated on `calibration` images.

    Weights use 7 of their 8 bits (reduce_range): onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI
    (AVX2 only) add pairs of products in int16, which saturates with full-range weights; onnxruntime's
    documentation recommends reduce_range there, and 7-bit weights run at the same speed."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), 32))

        def get_next(self):
            i = next(self.batches, None)
            return None if i is None else {INPUT_NAME: _prepared(prep, calibration.images[i:i + 32])}

    # Shape inference and graph optimisation (BatchNorm folding, ...) first, as onnxruntime recommends.
    pre = work / "preprocessed.onnx"
    quant_pre_process(str(float_path), str(pre))
    t0 = time.perf_counter()
    logging.disable(logging.WARNING)  # the quantizer logs a warning per 1-D weight (norm layers) it skips per channel
    try:
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.disable(logging.NOTSET)
    return {"method": "static, QDQ", "weights": "int8, per channel, 7-bit range", "activations": "uint8, per tensor",
            "calibration": "minmax", "calibration_images": len(calibration),
            "calibration_source": "the run's own training split (its seed, --val-fraction and --train-subset); "
                                  "no validation or test image",
            "quantize_time_s": time.perf_counter() - t0}


def evaluate_sessions(sessions: dict, test, prep, batch_size: int, progress: bool) -> dict:
    """Accuracy, predictions and images/s of each session over the whole test split. The sessions take each
    batch in turn (so a busy machine slows them alike); only session.run is timed, after a warmup."""
    first = _prepared(prep, test.images[:batch_size])
    for s in sessions.values():
        for _ in range(2):
            s.run([OUTPUT_NAME], {INPUT_NAME: first})
    preds = {k: [] for k in sessions}
    seconds = dict.fromkeys(sessions, 0.0)
    starts = range(0, len(test), batch_size)
    if progress:
        starts = tqdm(starts, desc="evaluating", leave=False, file=sys.stderr)
    for i in starts:
        x = _prepared(prep, test.images[i:i + batch_size])
        for k, s in sessions.items():
            t0 = time.perf_counter()
            out = s.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            seconds[k] += time.perf_counter() - t0
            preds[k].append(out.argmax(1))
    labels = test.labels.numpy()
    return {k: {"predictions": np.concatenate(preds[k]),
                "test_acc": float((np.concatenate(preds[k]) == labels).mean()),
                "images_per_s": len(labels) / seconds[k]} for k in sessions}


# ------------------------------------------------------------------------------------------ the verb

def default_out(run_dir: Path, quantize: str | None) -> Path:
    return run_dir / ("model.int8.onnx" if quantize == "int8" else "model.onnx")


def report_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_run(run_dir: str | Path, *, out: str | Path | None = None, quantize: str | None = None,
               overwrite: bool = False, calibration_images: int = 512, batch_size: int = 64,
               threads: int | None = None, data_dir: str | None = None, progress: bool = True) -> dict:
    """Export a finished run to a verified ONNX file (int8 with quantize="int8"); returns the report written
    beside it."""
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZE)}")
    for name, value in (("--calibration-images", calibration_images), ("--batch-size", batch_size),
                        ("--threads", 1 if threads is None else threads)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(f"export needs onnx, onnxruntime and onnxscript ({err}); "
                        f"install them with: pip install 'transferbench[export]'") from None

    run_dir = Path(run_dir).expanduser()
    out = Path(out).expanduser() if out else default_out(run_dir, quantize)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out to choose another file")
    run = load_run(run_dir)
    splits = run.splits(data_dir)
    prep = _preprocess(run)
    x, reference = _verification_inputs(run, splits.test, prep)

    info = {"format": "onnx", "file": out.name, "precision": "int8" if quantize else "float32", **contract(run),
            "source": {"run_dir": str(run_dir.resolve()), "model": run.cfg.model, "dataset": run.cfg.dataset,
                       "strategy": run.cfg.strategy, "seed": run.cfg.seed,
                       "recorded_test_acc": run.saved.get("test_acc")}}
    meta = {METADATA_KEY: json.dumps({k: info[k] for k in ("input", "output", "classes")})}

    rundir.writable_dir(out.parent, "--out")
    # Everything is built and checked in a temporary directory beside --out, then renamed into place.
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        final = work / "model.onnx"
        exporter, verification = export_verified(run, x, reference, final, meta)
        info["export"] = {"exporter": exporter, "opset": OPSET, "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]},
                          **_versions()}
        info["verification"] = {"against": "the PyTorch model of model.pt, on test images preprocessed as in "
                                           "evaluation",
                                **verification}
        if quantize == "int8":
            train = splits.train
            calib = train.subset(stratified_subset(train.labels, min(calibration_images, len(train)), run.cfg.seed))
            int8 = work / "model.int8.onnx"
            try:
                info["quantization"] = quantize_int8(final, int8, calib, prep, work)
                _set_metadata(int8, meta)
                check = compare(_session(int8), x, reference, (len(x), 1))
            except Exception as err:
                raise UserError(f"refusing to export: int8 quantization failed ({type(err).__name__}: {err})") from None
            # Quantization changes logits by design: the difference is reported, not enforced; the graph must
            # still run at any batch size and return finite logits.
            if "max_abs_diff" not in check:  # wrong output shape at some batch size
                raise UserError(f"refusing to export: the int8 graph {check['problem']}")
            if not math.isfinite(check["max_abs_diff"]):
                raise UserError("refusing to export: the int8 graph returns non-finite logits on test images")
            info["int8_vs_pytorch"] = {k: check[k] for k in ("images", "batch_sizes", "max_abs_diff", "argmax_differs")}
            sessions = {"float32": _session(final, threads), "int8": _session(int8, threads)}
            results = evaluate_sessions(sessions, splits.test, prep, batch_size, progress)
            f32, i8 = results["float32"], results["int8"]
            info["evaluation"] = {
                "test_images": len(splits.test), "batch_size": batch_size, "threads": threads or "onnxruntime default",
                "cpu_count": os.cpu_count(), "processor": cpu_name(),
                "pytorch_recorded_test_acc": run.saved.get("test_acc"),
                "float32": {"test_acc": f32["test_acc"], "images_per_s": f32["images_per_s"],
                            "size_mib": final.stat().st_size / 2**20},
                "int8": {"test_acc": i8["test_acc"], "images_per_s": i8["images_per_s"],
                         "size_mib": int8.stat().st_size / 2**20},
                "int8_float32_agreement": float((i8["predictions"] == f32["predictions"]).mean()),
                "int8_speedup": i8["images_per_s"] / f32["images_per_s"],
            }
            del sessions
            final = int8
        info["sha256"] = file_digest(final, "sha256")
        info["size_bytes"] = final.stat().st_size
        # The contract first, then the model: whenever the new model file exists, its contract is beside it.
        rundir.atomic_write_json(report_path(out), info)
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["out"] = str(out)
    return info


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def format_report(info: dict) -> str:
    v = info["verification"]
    lines = [f"verified against PyTorch on {v['images']} test images at batch sizes {v['batch_sizes'][0]} and "
             f"{v['batch_sizes'][1]}: max |onnx - torch| = {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}), "
             f"predicted class identical ({info['export']['exporter']} exporter, opset {info['export']['opset']})"]
    if "int8_vs_pytorch" in info:
        q = info["int8_vs_pytorch"]
        lines.append(f"int8 vs PyTorch on the same images: max |int8 - torch| = {q['max_abs_diff']:.3g}, "
                     f"predicted class differs on {q['argmax_differs']} of {q['images']}")
    ev = info.get("evaluation")
    if ev:
        lines += [f"test split, {ev['test_images']} images, batch {ev['batch_size']}, onnxruntime CPU "
                  f"({ev['processor']}, {ev['cpu_count']} cores, threads: {ev['threads']}):",
                  f"  {'model':<8} {'test acc':>9} {'images/s':>9} {'MiB':>8}"]
        if ev["pytorch_recorded_test_acc"] is not None:
            lines.append(f"  {'pytorch':<8} {ev['pytorch_recorded_test_acc']:>9.4f} {'-':>9} {'-':>8}")
        for k in ("float32", "int8"):
            r = ev[k]
            lines.append(f"  {k:<8} {r['test_acc']:>9.4f} {r['images_per_s']:>9.1f} {r['size_mib']:>8.2f}")
        lines.append(f"  int8 predicts the float model's class on {ev['int8_float32_agreement']:.2%} of test images; "
                     f"{ev['int8_speedup']:.2f}x the float images/s")
    lines.append(f"wrote {info['out']} and {report_path(Path(info['out'])).name}")
    return "\n".join(lines)
