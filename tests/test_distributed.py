"""torchrun with 2 CPU processes (gloo) gives the same run as one process with the same global batch,
through a phase change (two-phase rebuilds the DDP wrapper when requires_grad changes) and a resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

ARGS = ["--model", "timm:test_vit", "--no-pretrained", "--strategy", "two-phase", "--epochs", "3", "--image-size", "32",
        "--no-augment", "--optimizer", "sgd", "--lr", "0.05", "--no-progress", "--workers", "1", "--val-fraction",
        "0.25", "--device", "cpu"]


KILLER = """
import sys
from transferbench import cli, training

def stop(epoch):
    if epoch == 2:
        raise KeyboardInterrupt

training.after_epoch = stop
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ddp_two_processes_match_one(folder, tmp_path, cli_run):
    # No BatchNorm and no dropout in test_vit, and no augmentation: with the same global batch the two
    # runs compute the same gradients, up to float summation order. SGD, because Adam divides by the
    # gradient's own scale and so blows float noise in exactly-zero gradients (attention key biases) up.
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", *ARGS, "--batch-size", "8",
                           "--output-dir", tmp_path / "single", "--name", "r")
    assert code == 0, err
    # The distributed run is killed after epoch 2 (mid-phase, both ranks) and resumed, so the comparison
    # below also shows that resuming a distributed run ends where an uninterrupted one would.
    killer = tmp_path / "killed_after_epoch_2.py"
    killer.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_args = ["--dataset", f"folder:{folder}", *ARGS, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp"),
                "--name", "r"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, str(killer), "run", *ddp_args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "ddp" / "r" / "summary.json").exists(), proc.stderr[-3000:]
    proc = subprocess.run([*torchrun, "-m", "transferbench", "run", *ddp_args, "--resume"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["r"]  # only rank 0 wrote, one run directory
    assert proc.stdout.count("test acc") == 1  # and only rank 0 logged
    single = json.loads((tmp_path / "single" / "r" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "r" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["test_images"] == single["test_images"] == 18
    assert ddp["test_acc"] == single["test_acc"]
    assert ddp["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)
    m1 = [json.loads(l) for l in (tmp_path / "single" / "r" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(l) for l in (tmp_path / "ddp" / "r" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    s1 = torch.load(tmp_path / "single" / "r" / "model.pt", weights_only=False)["state_dict"]
    s2 = torch.load(tmp_path / "ddp" / "r" / "model.pt", weights_only=False)["state_dict"]
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-5), k
