"""What a user trusts without checking: atomic files, exact resumes, the selected weights, the documented
learning rates, faithful pixels, verified downloads and exports. Each test is built so that it fails when the
behaviour it names is broken (each was checked against a deliberately broken copy)."""
import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import write_cifar
from transferbench import data, export, rundir, training
from transferbench.errors import UserError
from transferbench.models import create_model

try:  # where decoding lives: transferbench.images, formerly transferbench.data
    from transferbench.images import image_array
except ImportError:
    from transferbench.data import image_array

COMMON = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--val-fraction", "0.25"]
TIMING = ("epoch_time_s", "images_per_s")


def read_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def model_state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=False, map_location="cpu")["state_dict"]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def kill_after(monkeypatch, n):
    """A process killed (Ctrl-C) once epoch n's checkpoint is on disk."""
    def killed(epoch):
        if epoch == n:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "after_epoch", killed)


def count_epochs(monkeypatch):
    """The 0-based epochs that train_one_epoch is called for in this process."""
    trained = []
    real = training.train_one_epoch

    def counting(exp, state, epoch):
        trained.append(epoch)
        return real(exp, state, epoch)

    monkeypatch.setattr(training, "train_one_epoch", counting)
    return trained


@pytest.fixture
def tiny_weights(tmp_path):
    """A local state dict for timm's test_resnet (BatchNorm included, 10x cheaper than resnet18), with
    non-trivial running statistics, so "unchanged" means something."""
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 1000).model
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- 1. atomic writes

class DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


def _half_writing_open(monkeypatch, directory):
    """open() for files in `directory` that writes half of what it is given, then fails as a full disk does."""
    import builtins

    real_open = builtins.open

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            self.f.write(chunk[: max(1, len(chunk) // 2)])
            self.f.flush()
            raise DiskFull()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, type(directory))) and str(directory) in str(file) and "w" in mode:
            return HalfFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


def _half_writing_torch_save(monkeypatch):
    real_save = torch.save

    def fake_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        part = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(part)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(part)
        raise DiskFull()

    monkeypatch.setattr(torch, "save", fake_save)


@pytest.mark.parametrize("writer", ["json", "jsonl", "text", "bytes", "torch"])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, writer):
    d = tmp_path / "run"
    d.mkdir()
    target = d / "file"
    old = b'{"the": "previous version"}\n'
    target.write_bytes(old)
    (d / "neighbour.json").write_bytes(b"{}")
    new = {"w": list(range(1000))}
    write = {
        "json": lambda: rundir.atomic_write_json(target, new),
        "jsonl": lambda: rundir.atomic_write_jsonl(target, [new, new]),
        "text": lambda: rundir.atomic_write_text(target, json.dumps(new)),
        "bytes": lambda: rundir.atomic_write_bytes(target, json.dumps(new).encode()),
        "torch": lambda: rundir.atomic_torch_save({"w": torch.arange(1000)}, target),
    }[writer]
    with monkeypatch.context() as mp:
        if writer == "torch":
            _half_writing_torch_save(mp)
        else:
            _half_writing_open(mp, d)
        with pytest.raises((OSError, UserError), match="No space left"):  # as it is, or as one clear line
            write()
    assert target.read_bytes() == old
    assert sorted(p.name for p in d.iterdir()) == ["file", "neighbour.json"]  # no temporary left behind
    write()  # and the same write, once the disk has room, replaces the file
    assert target.read_bytes() != old and sorted(p.name for p in d.iterdir()) == ["file", "neighbour.json"]


def test_a_json_value_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text('{"test_acc": 0.5}\n')
    with pytest.raises(TypeError):
        rundir.atomic_write_json(target, {"test_acc": 0.75, "bad": object()})  # fails after "test_acc" is encoded
    assert target.read_text() == '{"test_acc": 0.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", refuse)
        mp.setattr(os, "rename", refuse)
        with pytest.raises((PermissionError, UserError), match="Permission denied"):
            rundir.atomic_torch_save({"w": torch.ones(3)}, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# --------------------------------------------------------------------- 2-5. resume, exactly

def run_args(folder, tmp_path, *extra):
    return ["run", "--dataset", f"folder:{folder}", "--output-dir", tmp_path / "runs", *COMMON, *extra]


def test_resume_refuses_changed_result_options_and_accepts_neutral_ones(folder, tmp_path, cli_run, monkeypatch,
                                                                       one_thread):
    args = run_args(folder, tmp_path, "--model", "simple_cnn", "--strategy", "scratch", "--epochs", "3",
                    "--lr", "0.001", "--label-smoothing", "0.1", "--name", "r")
    kill_after(monkeypatch, 1)
    assert cli_run(*args)[0] == 130
    run_dir = tmp_path / "runs" / "r"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    monkeypatch.setattr(training, "after_epoch", lambda epoch: None)
    for name, flag, old, new in [("lr", "--lr", "0.001", "0.005"), ("epochs", "--epochs", "3", "7"),
                                 ("batch.size", "--batch-size", "8", "6"),
                                 ("label.smoothing", "--label-smoothing", "0.1", "0.25")]:
        changed = [a for a in args]
        changed[changed.index(flag) + 1] = new
        code, _, err = cli_run(*changed, "--resume")
        assert code == 2 and "Traceback" not in err, (flag, err)
        assert re.search(rf"\b{name}\b", err) and old in err and new in err, (flag, err)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # the refused resume touched nothing
    trained = count_epochs(monkeypatch)
    neutral = [a for a in args]
    neutral[neutral.index("--workers") + 1] = "2"
    code, _, err = cli_run(*neutral, "--resume")
    assert code == 0, err
    assert trained == [1, 2] and (run_dir / "summary.json").exists()


RESUME_CASES = {
    # strategy options, epoch after which the first process is killed
    "two-phase-at-the-phase-boundary": (["--strategy", "two-phase", "--head-epochs", "1", "--lr", "1e-2",
                                         "--warmup-epochs", "1"], 1),
    "two-phase-inside-phase-2": (["--strategy", "two-phase", "--head-epochs", "1", "--lr", "1e-2",
                                  "--warmup-epochs", "1"], 2),
    "linear-probe-on-cached-features": (["--strategy", "linear-probe", "--no-augment", "--lr", "1e-2"], 1),
    "after-the-last-epoch": (["--strategy", "last-n:4", "--lr", "1e-2"], 3),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_trains_only_the_remaining_epochs_and_ends_as_an_uninterrupted_run(folder, tmp_path, cli_run,
                                                                                 monkeypatch, tiny_weights,
                                                                                 one_thread, case):
    options, killed_after = RESUME_CASES[case]
    args = run_args(folder, tmp_path, "--model", "timm:test_resnet", "--weights", tiny_weights, "--epochs", "3",
                    *options)
    code, _, err = cli_run(*args, "--name", "straight")
    assert code == 0, err
    kill_after(monkeypatch, killed_after)
    code, _, err = cli_run(*args, "--name", "killed")
    assert code == 130, err
    monkeypatch.setattr(training, "after_epoch", lambda epoch: None)
    trained = count_epochs(monkeypatch)
    code, out, err = cli_run(*args, "--name", "killed", "--resume")
    assert code == 0, err
    assert trained == list(range(killed_after, 3))  # only the epochs the killed process had not finished

    a, ma = read_run(tmp_path / "runs" / "straight")
    b, mb = read_run(tmp_path / "runs" / "killed")
    assert untimed(ma) == untimed(mb) and len(mb) == 3
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "trainable_params", "feature_cache"):
        assert a[key] == b[key], key
    assert b["feature_cache"] is (case == "linear-probe-on-cached-features")
    sa, sb = model_state(tmp_path / "runs" / "straight"), model_state(tmp_path / "runs" / "killed")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


# ------------------------------------------------------------------- 6. export verification rule

class FakeSession:
    """Stands in for onnxruntime: x holds row numbers; returns reference + delta for those rows, and
    `at_batch_1` in place of delta when run one image at a time."""

    def __init__(self, reference, delta, at_batch_1=None):
        self.out = reference + delta
        self.out1 = reference + (delta if at_batch_1 is None else at_batch_1)

    def run(self, names, feed):
        rows = feed[export.INPUT_NAME][:, 0].astype(int)
        return [(self.out1 if len(rows) == 1 else self.out)[rows]]


def check(reference, delta, at_batch_1=None):
    x = np.arange(len(reference), dtype=np.float32).reshape(-1, 1)
    return export.compare(FakeSession(reference, delta, at_batch_1), x, reference, (len(reference), 1))


def test_export_tolerance_is_relative_to_the_largest_logit_and_exact_at_its_boundary():
    reference = np.array([[10.0, 2.0, -3.0], [1.0, 7.0, 0.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    tol = 1e-3 * 10.0  # the README: 1e-3 x max(1, largest |logit|)
    ok = check(reference, np.full_like(reference, 0.99 * tol))  # float32 logits: exact to ~1e-6 here
    assert ok["passed"] and ok["tolerance"] == pytest.approx(tol)
    assert ok["max_abs_diff"] == pytest.approx(0.99 * tol, abs=2e-6)
    over = np.zeros_like(reference)
    over[1, 2] = 1.01 * tol  # one logit, no class change
    bad = check(reference, over)
    assert not bad["passed"] and bad["argmax_differs"] == 0 and "problem" in bad
    # Small logits: the tolerance does not shrink below 1e-3.
    small = reference / 100
    assert check(small, np.full_like(small, 0.99e-3))["passed"]
    assert not check(small, np.full_like(small, 1.01e-3))["passed"]
    # Every batch size is checked: right at batch 32, wrong one image at a time.
    assert not check(reference, np.zeros_like(reference), at_batch_1=np.full_like(reference, 2 * tol))["passed"]
    # Non-finite output is never within tolerance.
    nan = np.zeros_like(reference)
    nan[0, 0] = np.nan
    assert not check(reference, nan)["passed"]


def test_export_refuses_a_class_flip_within_tolerance_unless_pytorch_had_a_near_tie():
    tol = 1e-3 * 10.0
    # Image 1: classes 0 and 1 apart by 1.5 x tol; moving each by 0.8 x tol (within tolerance) swaps them.
    reference = np.array([[10.0, 0.0, 0.0], [3.0, 3.0 - 1.5 * tol, 0.0]], dtype=np.float32)
    delta = np.zeros_like(reference)
    delta[1, 0], delta[1, 1] = -0.8 * tol, 0.8 * tol
    flipped = check(reference, delta)
    assert flipped["max_abs_diff"] <= flipped["tolerance"]
    assert not flipped["passed"] and flipped["argmax_differs"] == 1
    # A near tie in PyTorch itself (margin 0.5 x tol) may flip under float noise within tolerance.
    reference[1, 1] = 3.0 - 0.5 * tol
    delta[1, 0], delta[1, 1] = -0.4 * tol, 0.4 * tol
    tie = check(reference, delta)
    assert check_flipped(reference, delta) and tie["passed"] and tie["argmax_differs"] == 0


def check_flipped(reference, delta):
    return bool((reference.argmax(1) != (reference + delta).argmax(1)).any())


# ------------------------------------------------------------------- 7. zero-shot changes nothing

def test_zero_shot_keeps_every_loaded_weight_and_trains_nothing(folder, tmp_path, cli_run, monkeypatch, one_thread):
    torch.manual_seed(123)
    model = create_model("resnet18", 1000).model
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    initial = model.state_dict()
    trained = count_epochs(monkeypatch)
    code, _, err = cli_run(*run_args(folder, tmp_path, "--model", "resnet18", "--weights", path,
                                     "--strategy", "zero-shot", "--seed", "3"))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "imgs-resnet18-zero-shot-s3"
    final = model_state(run_dir)
    backbone = [k for k in final if not k.startswith("fc.")]
    assert len(backbone) == len(initial) - 2
    for k in backbone:
        assert torch.equal(final[k], initial[k]), f"{k} changed under zero-shot"
    torch.manual_seed(3)  # the head a run with --seed 3 initialises
    fresh = create_model("resnet18", 3, weights=path, image_size=16).model.state_dict()
    assert torch.equal(final["fc.weight"], fresh["fc.weight"]) and torch.equal(final["fc.bias"], fresh["fc.bias"])
    assert trained == []
    summary, metrics = read_run(run_dir)
    assert len(metrics) == 1 and metrics[0]["train_loss"] is None and summary["train_time_s"] == 0
    code, out, err = cli_run("evaluate", run_dir)
    assert code == 0 and json.loads(out)["test_acc"] == summary["test_acc"]


# ------------------------------------------------------- 8. the test split sees the selected weights

def test_test_split_is_scored_with_the_best_validation_epochs_weights(folder, tmp_path, cli_run, monkeypatch,
                                                                      one_thread):
    """Validation accuracy is scripted to peak at epoch 2 of 3: model.pt and test_acc must be epoch 2's."""
    scripted = iter([0.4, 0.9, 0.6])
    prepared = {}
    real_prepare, real_evaluate = training.prepare, training.evaluate

    def prepare(*args, **kwargs):
        prepared["exp"] = real_prepare(*args, **kwargs)
        return prepared["exp"]

    def evaluate(model, batches, *args, **kwargs):
        loss, acc = real_evaluate(model, batches, *args, **kwargs)
        return (loss, next(scripted)) if batches is prepared["exp"].val else (loss, acc)

    run_dir = tmp_path / "runs" / "imgs-simple_cnn-scratch-s0"
    snapshots = {}

    def snapshot(epoch):
        snapshots[epoch] = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")["model"]

    monkeypatch.setattr(training, "prepare", prepare)
    monkeypatch.setattr(training, "evaluate", evaluate)
    monkeypatch.setattr(training, "after_epoch", snapshot)
    code, _, err = cli_run(*run_args(folder, tmp_path, "--model", "simple_cnn", "--strategy", "scratch",
                                     "--epochs", "3", "--lr", "3e-3"))
    assert code == 0, err
    summary, metrics = read_run(run_dir)
    assert [m["val_acc"] for m in metrics] == [0.4, 0.9, 0.6]
    assert summary["best_epoch"] == 2 and summary["best_val_acc"] == 0.9
    final = model_state(run_dir)
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)  # the last epoch did change the weights
    monkeypatch.setattr(training, "prepare", real_prepare)
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    code, out, err = cli_run("evaluate", run_dir)
    assert code == 0, err
    assert json.loads(out)["test_acc"] == summary["test_acc"]  # test_acc is what model.pt (epoch 2) scores


# ------------------------------------------------------------------- 9. the documented learning rates

def test_two_phase_trains_the_head_at_lr_then_everything_at_lr_times_scale(folder, tmp_path, cli_run, monkeypatch,
                                                                          tiny_weights, one_thread):
    seen = []
    real = training.start_phase

    def recording(exp, phase):
        state = real(exp, phase)
        params = sum(p.numel() for g in state.optimizer.param_groups for p in g["params"])
        seen.append((phase.index, [g["lr"] for g in state.optimizer.param_groups],
                     [g["initial_lr"] for g in state.optimizer.param_groups], params))
        return state

    monkeypatch.setattr(training, "start_phase", recording)
    code, _, err = cli_run(*run_args(folder, tmp_path, "--model", "timm:test_resnet", "--weights", tiny_weights,
                                     "--strategy", "two-phase", "--epochs", "2", "--head-epochs", "1",
                                     "--lr", "0.02", "--unfreeze-lr-scale", "0.25", "--warmup-epochs", "0"))
    assert code == 0, err
    assert [s[0] for s in seen] == [0, 1]
    (_, lr0, initial0, n0), (_, lr1, initial1, n1) = seen
    assert lr0 == pytest.approx([0.02] * len(lr0)) and initial0 == pytest.approx([0.02] * len(lr0))
    assert lr1 == pytest.approx([0.005] * len(lr1)) and initial1 == pytest.approx([0.005] * len(lr1))
    bundle = create_model("timm:test_resnet", 3)
    head = sum(p.numel() for p in bundle.model.get_submodule(bundle.head).parameters())
    assert n0 == head and n1 == sum(p.numel() for p in bundle.model.parameters())


# ---------------------------------------------------------------------- 10. pixels after decoding

def roundtrip(im, fmt="PNG", **save):
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    buf.seek(0)
    return Image.open(buf)


def test_grayscale_palette_bilevel_and_alpha_images_become_exact_rgb():
    grey = np.arange(0, 240, 15, dtype=np.uint8).reshape(4, 4)
    got = image_array(roundtrip(Image.fromarray(grey, "L")), None)
    assert got.shape == (4, 4, 3) and (got == grey[..., None]).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [[[200, 10, 30], [0, 255, 7]], [[90, 91, 92], [1, 2, 3]]]
    rgba[..., 3] = [[0, 255], [128, 7]]  # alpha is dropped, never blended into the colours
    got = image_array(roundtrip(Image.fromarray(rgba, "RGBA")), None)
    assert (got == rgba[..., :3]).all()

    la = np.stack([grey, 255 - grey], -1)
    got = image_array(roundtrip(Image.fromarray(la, "LA")), None)
    assert (got == grey[..., None]).all()

    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 12, 34, 56] + [0] * (256 * 3 - 9))
    pal.putdata([2, 0, 1])
    got = image_array(roundtrip(pal), None)
    assert got.tolist() == [[[12, 34, 56], [255, 0, 0], [0, 255, 0]]]

    bits = Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).convert("1")
    got = image_array(roundtrip(bits), None)
    assert got[..., 0].tolist() == [[0, 255, 255, 0]] and (got == got[..., :1]).all()


def test_16_bit_images_are_scaled_by_their_range_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    im = roundtrip(Image.fromarray(values))
    assert im.mode.startswith("I")  # decoded as 16-bit, as a 16-bit PNG is
    got = image_array(im, None)
    assert got[..., 0].tolist() == [[0, 1, 128, 255]] and (got == got[..., :1]).all()


def test_exif_orientation_is_applied():
    pixels = (np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 12)  # 2 rows x 3 columns, all distinct
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im = roundtrip(Image.fromarray(pixels), exif=exif)
    assert im.getexif()[0x0112] == 6
    got = image_array(im, None)
    assert got.shape == (3, 2, 3)
    assert (got == np.rot90(pixels, k=-1)).all()
    assert (got == np.asarray(ImageOps.exif_transpose(roundtrip(Image.fromarray(pixels), exif=exif)))).all()


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_resize_is_shorter_side_then_centre_crop(portrait):
    """40x24 at size 20: shorter side 24 -> 20 (longer 40 -> 33), then the centre 20x20. A red centre
    survives; blue bands at both ends of the long side are cut off; the result is torchvision's
    Resize(20, bicubic) + CenterCrop(20)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = np.zeros((24, 40, 3), np.uint8)
    img[..., 1] = 200
    img[:, :4] = [0, 0, 255]
    img[:, -4:] = [0, 0, 255]
    img[8:16, 16:24] = [255, 0, 0]
    if portrait:
        img = img.transpose(1, 0, 2).copy()
    im = Image.fromarray(img)
    got = image_array(im, 20)
    assert got.shape == (20, 20, 3)
    assert got[10, 10, 0] > 240 and got[10, 10, 1:].max() < 15
    assert got[..., 2].max() < 40  # no trace of the blue ends
    assert got[..., 1].max() > 150  # green background both sides of the centre
    expected = np.asarray(TF.center_crop(TF.resize(im, 20, interpolation=InterpolationMode.BICUBIC), [20, 20]))
    assert (got == expected).all()


# ---------------------------------------------------------------------- 11. CIFAR archive checked

def test_a_cifar_archive_with_the_wrong_md5_is_refused_and_not_extracted(tmp_path, monkeypatch, cli_run):
    from torchvision.datasets import CIFAR10

    # A well-formed archive of loadable files (their own md5s patched in), so that skipping the archive's md5
    # check would extract it and the run would go on.
    staging = write_cifar(tmp_path / "staging", "cifar10", monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / CIFAR10.base_folder, arcname=CIFAR10.base_folder)
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    assert actual != CIFAR10.tgz_md5

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", no_network)
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", no_network)
    with pytest.raises(UserError) as err:
        data.ensure_cifar("cifar10", data_dir)
    message = str(err.value)
    assert str(archive) in message and actual in message and CIFAR10.tgz_md5 in message
    assert sorted(p.name for p in data_dir.iterdir()) == [CIFAR10.filename]  # nothing extracted

    code, _, err_text = cli_run("run", "--dataset", "cifar10", "--data-dir", data_dir, "--model", "simple_cnn",
                                "--strategy", "scratch", "--epochs", "1", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 2 and actual in err_text and CIFAR10.tgz_md5 in err_text and "Traceback" not in err_text
    assert sorted(p.name for p in data_dir.iterdir()) == [CIFAR10.filename]
