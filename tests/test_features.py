"""The feature cache: keyed by everything that determines the features, and equal to the plain path."""
import json

import pytest
import torch

from transferbench.features import cached_features, extract_features, feature_key
from transferbench.images import ImageSet
from transferbench.models import create_model
from transferbench.preprocess import Preprocess

CPU = torch.device("cpu")


def prep(size, mean=(0.5,) * 3):
    return Preprocess(size, mean, (0.25,) * 3, "bilinear", CPU, channels_last=True)


@pytest.fixture
def split():
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(6) % 3,
                    list("abc"))


def test_key_changes_with_every_input_and_only_then(split):
    torch.manual_seed(0)
    a = create_model("resnet18", 3)
    torch.manual_seed(0)
    a_again = create_model("resnet18", 3)
    base = feature_key(a, prep(16), "resnet18", split)
    assert feature_key(a_again, prep(16), "resnet18", split) == base
    torch.manual_seed(1)
    other_head = create_model("resnet18", 3)
    other_head.model.load_state_dict({k: v for k, v in a.model.state_dict().items() if not k.startswith("fc.")},
                                     strict=False)
    assert feature_key(other_head, prep(16), "resnet18", split) == base  # the head is not part of the features
    assert feature_key(a, prep(24), "resnet18", split) != base  # image size
    assert feature_key(a, prep(16, mean=(0.4, 0.5, 0.5)), "resnet18", split) != base  # normalisation
    changed = ImageSet(split.images.clone(), split.labels, split.classes)
    changed.images[0, 0, 0, 0] ^= 1
    assert feature_key(a, prep(16), "resnet18", changed) != base  # one pixel of the split
    assert feature_key(a, prep(16), "resnet18", ImageSet(split.images[:5], split.labels[:5], split.classes)) != base
    with torch.no_grad():
        a.model.layer1[0].bn1.running_mean[0] += 1e-3
    assert feature_key(a, prep(16), "resnet18", split) != base  # any backbone tensor, buffers included
    assert feature_key(a_again, prep(16), "timm:resnet18", split) != base  # model name


def test_cached_features_are_what_the_head_sees(split, tmp_path):
    torch.manual_seed(0)
    b = create_model("resnet18", 3)
    feats = cached_features(b, split, prep(16), "resnet18", CPU, 4, "test").images
    assert feats.shape == (6, 512)
    b.model.eval()
    with torch.no_grad():
        logits = b.model(prep(16)(split.images))
    assert torch.allclose(b.model.fc(feats), logits, atol=1e-5)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 1
    again = cached_features(b, split, prep(16), "resnet18", CPU, 4, "test").images  # from disk this time
    assert torch.equal(again, feats)
    assert torch.equal(extract_features(b, split, prep(16), CPU, 6), feats)


def test_cached_linear_probe_equals_the_plain_one(folder, tmp_path, cli_run):
    args = ["run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--no-pretrained", "--strategy",
            "linear-probe",
            "--no-augment", "--epochs", "3", "--image-size", "16", "--batch-size", "8", "--no-progress", "--workers",
            "1",
            "--output-dir", tmp_path / "runs", "--lr", "1e-2"]
    assert cli_run(*args, "--feature-cache", "--name", "cached")[0] == 0
    assert cli_run(*args, "--no-feature-cache", "--name", "plain")[0] == 0
    runs = tmp_path / "runs"
    s_cached = json.loads((runs / "cached" / "summary.json").read_text())
    s_plain = json.loads((runs / "plain" / "summary.json").read_text())
    assert s_cached["feature_cache"] and not s_plain["feature_cache"]
    assert s_cached["test_acc"] == s_plain["test_acc"]
    assert s_cached["best_epoch"] == s_plain["best_epoch"]
    w_cached = torch.load(runs / "cached" / "model.pt", weights_only=False)["state_dict"]
    w_plain = torch.load(runs / "plain" / "model.pt", weights_only=False)["state_dict"]
    assert torch.allclose(w_cached["fc.weight"], w_plain["fc.weight"], atol=1e-5)


def test_feature_cache_refuses_augmentation_and_other_strategies(folder, tmp_path, cli_run):
    base = ["run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--no-pretrained", "--epochs", "1",
            "--image-size", "16", "--no-progress", "--output-dir", tmp_path / "runs", "--feature-cache"]
    code, _, err = cli_run(*base, "--strategy", "linear-probe", "--augment")
    assert code == 2 and "do not mix" in err
    code, _, err = cli_run(*base, "--strategy", "full", "--no-augment")
    assert code == 2 and "only applies to strategy linear-probe" in err
