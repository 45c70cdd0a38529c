"""`transferbench export`: verified ONNX with its preprocessing contract, refusal, bad inputs, int8."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_folder
from transferbench import cli, export

COMMON = ["--batch-size", "8", "--no-progress", "--workers", "1", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs, made once: a trained simple_cnn, and an untrained ViT built for 32 px (timm's
    test_vit expects 160 px unless told otherwise, so rebuilding it needs the run's image size)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERBENCH_CACHE", str(root / "cache"))
        folder = make_folder(root / "imgs")
        for args in (["--model", "simple_cnn", "--strategy", "scratch", "--epochs", "2", "--image-size", "16"],
                     ["--model", "timm:test_vit", "--no-pretrained", "--strategy", "zero-shot", "--image-size", "32"]):
            assert cli.main(["run", "--dataset", f"folder:{folder}", "--output-dir", str(root / "runs"), *args,
                             *COMMON]) == 0
    return {"cnn": root / "runs" / "imgs-simple_cnn-scratch-s0", "vit": root / "runs" / "imgs-test_vit-zero-shot-s0"}


def logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_export_writes_a_verified_onnx_file_with_dynamic_batch_and_its_contract(runs, cli_run, tmp_path):
    out = tmp_path / "deploy" / "cnn.onnx"
    code, stdout, err = cli_run("export", runs["cnn"], "--format", "onnx", "--out", out)
    assert code == 0, err
    assert "max |onnx - torch| = " in stdout and "predicted class identical" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["cnn.onnx", "cnn.onnx.json"]  # no temporary left behind

    info = json.loads((tmp_path / "deploy" / "cnn.onnx.json").read_text())
    assert info["input"]["size"] == 16 and info["input"]["shape"] == ["batch", 3, 16, 16]
    assert info["input"]["mean"] == [0.5] * 3 and info["input"]["std"] == [0.5] * 3
    assert info["classes"] == ["alpha", "beta", "gamma"] and info["precision"] == "float32"
    assert info["verification"]["passed"] and info["verification"]["max_abs_diff"] <= info["verification"]["tolerance"]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[export.METADATA_KEY])["classes"] == info["classes"]

    model = export.load_run(runs["cnn"]).model
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    for n in (1, 3):
        got = logits(out, x[:n])
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, expected[:n], atol=1e-4)


def test_a_fixed_size_vit_is_rebuilt_at_the_runs_image_size(runs, cli_run):
    code, stdout, err = cli_run("export", runs["vit"])
    assert code == 0, err
    assert logits(runs["vit"] / "model.onnx", np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 3)
    assert json.loads((runs["vit"] / "model.onnx.json").read_text())["input"]["size"] == 32


class Shifted(torch.nn.Module):
    """A model whose logits are off by one: what a broken export would look like."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 1.0


def test_a_graph_that_disagrees_with_pytorch_is_refused_and_nothing_is_written(runs, cli_run, monkeypatch, tmp_path):
    real = export._export
    monkeypatch.setattr(export, "_export", lambda model, *a: real(Shifted(model).eval(), *a))
    out = tmp_path / "deploy" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    code, stdout, err = cli_run("export", runs["cnn"], "--out", out, "--overwrite")
    assert code == 2 and "refusing to export" in err and "differ from PyTorch" in err and "Traceback" not in err
    assert "dynamo" in err and "torchscript" in err  # both exporters were tried
    assert out.read_bytes() == b"the previous export"  # left exactly as it was
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no contract, no temporary


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no-model", "has no model.pt"),
    ("exists", "already exists; pass --overwrite"),
    ("out-is-dir", "is a directory"),
    ("data-moved", "nowhere does not exist"),
])
def test_bad_inputs_are_clear_errors(runs, cli_run, tmp_path, case, message):
    run_dir, extra = runs["cnn"], []
    if case == "missing":
        run_dir = tmp_path / "nope"
    elif case == "no-model":
        run_dir = tmp_path / "empty-run"
        run_dir.mkdir()
    elif case == "exists":
        (tmp_path / "taken.onnx").write_bytes(b"keep me")
        extra = ["--out", tmp_path / "taken.onnx"]
    elif case == "out-is-dir":
        extra = ["--out", tmp_path]
    else:  # --data-dir says where a folder: dataset lives now
        extra = ["--data-dir", tmp_path / "nowhere"]
    code, _, err = cli_run("export", run_dir, *extra)
    assert code == 2 and message in err and "Traceback" not in err
    if case == "exists":
        assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"


def test_int8_quantization_is_calibrated_evaluated_and_timed(runs, cli_run):
    code, stdout, err = cli_run("export", runs["cnn"], "--quantize", "int8", "--calibration-images", "16")
    assert code == 0, err
    out = runs["cnn"] / "model.int8.onnx"
    graph = onnx.load(str(out)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights
    for n in (1, 3):
        assert logits(out, np.zeros((n, 3, 16, 16), np.float32)).shape == (n, 3)

    info = json.loads((runs["cnn"] / "model.int8.onnx.json").read_text())
    ev = info["evaluation"]
    assert info["precision"] == "int8" and info["quantization"]["calibration_images"] == 16
    assert ev["test_images"] == 18 and ev["int8"]["size_mib"] < ev["float32"]["size_mib"]
    for k in ("float32", "int8"):
        assert 0 <= ev[k]["test_acc"] <= 1 and ev[k]["images_per_s"] > 0
    assert ev["float32"]["test_acc"] == pytest.approx(ev["pytorch_recorded_test_acc"])
    assert ev["int8_float32_agreement"] >= 0.9
    assert "images/s" in stdout and "int8 predicts the float model's class on" in stdout
    assert "max |int8 - torch|" in stdout
