import pytest
import torch
from torch import nn

from transferbench import UserError
from transferbench.models import SimpleCNN, create_model, data_config, resolve_name
from transferbench.strategies import apply_trainable, parse_strategy, set_train_mode


def test_names_resolve_to_torchvision_first_then_timm():
    assert resolve_name("resnet18") == ("torchvision", "resnet18")
    assert resolve_name("timm:resnet18") == ("timm", "resnet18")
    assert resolve_name("tv:mobilenet_v2") == ("torchvision", "mobilenet_v2")
    assert resolve_name("tf_efficientnet_lite0") == ("timm", "tf_efficientnet_lite0")
    assert resolve_name("simple_cnn") == ("transferbench", "simple_cnn")


@pytest.mark.parametrize("name, hint", [("resnet5O", "resnet50"), ("timm:vit_base_patch16_22", "vit_base_patch16_224"),
                                        ("tv:resnt18", "resnet18")])
def test_unknown_model_suggests_close_names(name, hint):
    with pytest.raises(UserError, match=hint):
        resolve_name(name)


def test_normalisation_follows_the_weights_config():
    lite0 = data_config("tf_efficientnet_lite0")
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5) and lite0.interpolation == "bicubic"
    r18 = data_config("resnet18")
    assert r18.mean == pytest.approx((0.485, 0.456, 0.406)) and r18.input_size == 224


def test_simple_cnn_matches_the_published_architecture():
    m = SimpleCNN(10)
    convs = [(c.in_channels, c.out_channels) for c in m.modules() if isinstance(c, nn.Conv2d)]
    linears = [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, nn.Linear)]
    assert convs == [(3, 128), (128, 256), (256, 256)] and linears == [(256, 512), (512, 10)]
    assert all(d.p == 0.3 for d in m.modules() if isinstance(d, nn.Dropout))
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v2", "classifier.1"),
                                        ("timm:tf_efficientnet_lite0", "classifier")])
def test_head_is_replaced_for_the_dataset(name, head):
    b = create_model(name, 7)
    assert b.head == head and b.model.get_submodule(head).out_features == 7
    assert [n for n, _ in b.model.named_parameters()][-1].startswith(head + ".")


def test_local_weights_load_everything_but_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", 1000).model
    state = source.state_dict()
    torch.save({"state_dict": state}, tmp_path / "w.pth")  # wrapped, as many checkpoints are
    b = create_model("resnet18", 5, weights=tmp_path / "w.pth")
    for k, v in b.model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, state[k]), k
    assert b.model.fc.out_features == 5


def test_weights_that_do_not_fit_name_the_offending_keys(tmp_path):
    state = create_model("resnet18", 1000).model.state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError) as info:
        create_model("resnet18", 5, weights=tmp_path / "bad.pth")
    msg = str(info.value)
    assert "layer4.1.bn2.weight" in msg and "extra.weight" in msg and "conv1.weight" in msg
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="is a text file, not PyTorch weights"):
        create_model("resnet18", 5, weights=tmp_path / "junk.pth")


def test_last_n_25_on_resnet50_trains_exactly_its_last_25_tensors():
    b = create_model("resnet50", 100)
    names = [n for n, _ in b.model.named_parameters()]
    trainable = parse_strategy("last-n:25").trainable(b.model, b.head)
    assert trainable == frozenset(names[-25:]) and {"fc.weight", "fc.bias"} <= trainable
    apply_trainable(b.model, trainable)
    assert [n for n, p in b.model.named_parameters() if p.requires_grad] == names[-25:]


def test_strategy_phases():
    b = create_model("resnet18", 3)
    names = frozenset(n for n, _ in b.model.named_parameters())
    head = frozenset({"fc.weight", "fc.bias"})
    assert parse_strategy("linear-probe").trainable(b.model, b.head) == head
    assert parse_strategy("zero-shot").trainable(b.model, b.head) == frozenset()
    assert parse_strategy("full").trainable(b.model, b.head) == names
    two = parse_strategy("two-phase").phases(b.model, b.head, epochs=5, head_epochs=2, unfreeze_lr_scale=0.1)
    assert [(p.first_epoch, p.end_epoch, p.trainable, p.lr_scale) for p in two] == [(0, 2, head, 1.0), (2, 5, names,
                                                                                                        0.1)]
    with pytest.raises(UserError, match="more parameter tensors than the model has \\(62\\)"):
        parse_strategy("last-n:63").trainable(b.model, b.head)


@pytest.mark.parametrize("text, message", [("last-n:0", "K >= 1"), ("last-n:x", "last-n:K"),
                                           ("linear_probe", "linear-probe"), ("full:3", "takes no")])
def test_bad_strategy_names(text, message):
    with pytest.raises(UserError, match=message):
        parse_strategy(text)


def test_frozen_parts_run_in_eval_mode():
    b = create_model("resnet18", 3)
    apply_trainable(b.model, parse_strategy("last-n:5").trainable(b.model, b.head))
    set_train_mode(b.model)
    assert not b.model.bn1.training and not b.model.layer1.training
    assert b.model.layer4[1].bn2.training and b.model.fc.training and b.model.training
