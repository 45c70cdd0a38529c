"""Model registry: one interface over torchvision, timm and the small from-scratch CNN.

`create_model` returns the network with a fresh classifier for the dataset's classes, the name of that
classifier module (what "head" means to every strategy), and the preprocessing contract of its weights.
"""
from __future__ import annotations

import inspect
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision.models as tvm
from torch import nn

from .errors import UserError, did_you_mean
from .preprocess import DataConfig


@dataclass
class ModelBundle:
    model: nn.Module
    head: str  # name of the classifier module
    data_config: DataConfig
    source: str  # "torchvision", "timm" or "transferbench"
    arch: str


class SimpleCNN(nn.Module):
    """The small CNN trained from scratch in the studies we reproduce."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, 128), *block(128, 256), *block(256, 256), nn.Dropout(dropout))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(256, 512)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.drop(torch.relu(self.fc1(x))))


def _torchvision_names() -> list[str]:
    return tvm.list_models(module=tvm)


def resolve_name(name: str) -> tuple[str, str]:
    """'resnet50' -> ('torchvision', 'resnet50'); bare names try torchvision first, then timm."""
    if name == "simple_cnn":
        return "transferbench", name
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("tv", "torchvision"):
        if rest not in _torchvision_names():
            raise UserError(f"unknown torchvision model '{rest}'.{did_you_mean(rest, _torchvision_names())}")
        return "torchvision", rest
    if sep and prefix == "timm":
        if not timm.is_model(rest):
            raise UserError(f"unknown timm model '{rest}'.{did_you_mean(rest, timm.list_models())}")
        return "timm", rest
    if sep:
        raise UserError(f"unknown model prefix '{prefix}:' in '{name}'; use tv:NAME or timm:NAME")
    if name in _torchvision_names():
        return "torchvision", name
    if timm.is_model(name):
        return "timm", name
    choices = dict.fromkeys(["simple_cnn", *_torchvision_names(), *timm.list_models()])
    raise UserError(f"unknown model '{name}' (not simple_cnn, a torchvision or a timm "
                    f"model).{did_you_mean(name, choices)}")


def _module_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier to replace; pick another model")
    return names[-1]


def _download_error(arch: str, err: Exception) -> UserError:
    return UserError(
        f"could not download pretrained weights for '{arch}' ({type(err).__name__}: {err}). "
        f"Offline, pass a local state dict with --weights FILE instead of --pretrained."
    )


def _torchvision_data_config(arch: str) -> DataConfig:
    preset = tvm.get_model_weights(arch).DEFAULT.transforms()
    crop = preset.crop_size[0] if isinstance(preset.crop_size, (list, tuple)) else preset.crop_size
    return DataConfig(int(crop), tuple(preset.mean), tuple(preset.std), preset.interpolation.value)


def _timm_data_config(arch: str) -> DataConfig:
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(arch).to_dict())
    return DataConfig(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])


def data_config(name: str) -> DataConfig:
    """The preprocessing contract of a model's weights, without building the model."""
    source, arch = resolve_name(name)
    if source == "transferbench":
        return DataConfig(32, (0.5,) * 3, (0.5,) * 3)
    return (_torchvision_data_config if source == "torchvision" else _timm_data_config)(arch)


def _torchvision(arch: str, pretrained: bool, image_size: int | None, drop_path: float | None) -> ModelBundle:
    kwargs = {}
    if drop_path is not None:
        if "stochastic_depth_prob" not in inspect.signature(tvm.get_model_builder(arch)).parameters and not any(
                "stochastic_depth_prob" in inspect.signature(c).parameters for c in _model_classes(arch)):
            raise UserError(f"--drop-path: torchvision model '{arch}' has no stochastic depth; drop the option or "
                            f"use a model that has it (efficientnet_*, convnext_*, swin_*, vit_*, ...)")
        kwargs["stochastic_depth_prob"] = drop_path
    try:
        model = tvm.get_model(arch, weights=tvm.get_model_weights(arch).DEFAULT if pretrained else None, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad download raises RuntimeError
        raise _download_error(arch, err) from None
    return ModelBundle(model, _last_linear(model), _torchvision_data_config(arch), "torchvision", arch)


def _model_classes(arch: str) -> list[type]:
    """The nn.Module classes a torchvision builder's module defines (where its real options live)."""
    module = inspect.getmodule(tvm.get_model_builder(arch))
    return [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)]


def _timm(arch: str, pretrained: bool, image_size: int | None, drop_path: float | None) -> ModelBundle:
    kwargs = {} if drop_path is None else {"drop_path_rate": drop_path}
    cfg = timm.get_pretrained_cfg(arch)
    if image_size and cfg is not None and cfg.fixed_input_size and image_size != cfg.input_size[-1]:
        kwargs["img_size"] = image_size  # ViT-style models: timm resamples position embeddings to fit
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as err:
        if drop_path is None:
            raise
        raise UserError(f"--drop-path: timm model '{arch}' has no stochastic depth ({err})") from None
    except (OSError, RuntimeError) as err:
        raise _download_error(arch, err) from None
    except Exception as err:  # huggingface_hub's offline errors are not OSErrors in every version
        if pretrained and "hub" in type(err).__module__:
            raise _download_error(arch, err) from None
        raise
    classifier = model.get_classifier()
    head = next(n for n, m in model.named_modules() if m is classifier)
    return ModelBundle(model, head, _timm_data_config(arch), "timm", arch)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights {path}: not a state dict (a mapping of parameter names to tensors). {EXPECTED}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


EXPECTED = ("expected a PyTorch state dict saved with torch.save(model.state_dict(), PATH) (.pth/.pt), "
            "optionally wrapped as {'state_dict': ...}")


def _what_file(path: Path) -> str | None:
    """What a weights file that torch refused is, from its first bytes; None for a PyTorch / pickle file."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras / TensorFlow weights?)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                return None if any(n.endswith("data.pkl") for n in z.namelist()) else "a zip archive (a .npz?)"
        except zipfile.BadZipFile:
            return "a damaged zip archive (an interrupted download?)"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy format, or a plain pickle
        return None
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a PyTorch file"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict, read safely (tensors only: a weights file never runs code)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"--weights {path} is a directory; give the state-dict file inside it. {EXPECTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--weights: no such file '{path}'") from None
    except Exception as err:
        what = _what_file(path)
        if what is not None or not isinstance(err, pickle.UnpicklingError):
            raise UserError(f"--weights {path} is {what or 'not readable as a PyTorch file'}, not PyTorch weights. "
                            f"{EXPECTED}") from None
        # A pickled Python object (typically a whole nn.Module saved with torch.save(model)): loading it would
        # run code from the file, which transferbench never does; torch's advice to do so is not repeated.
        raise UserError(f"--weights {path} holds pickled Python objects (a whole model saved with torch.save(model)?), "
                        f"not just tensors; load it where it was made and save model.state_dict() instead. "
                        f"{EXPECTED}") from None
    return _unwrap_state_dict(obj, path)


def load_backbone_weights(bundle: ModelBundle, path: str | Path) -> None:
    """Load a local state dict into everything but the classifier; any other mismatch is an error."""
    path = Path(path).expanduser()
    state = read_state_dict(path)
    prefix = bundle.head + "."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"--weights {path} has NaN or infinite values in {len(bad)} tensor(s): "
                        f"{', '.join(bad[:5])}" + (", ..." if len(bad) > 5 else "") + "; the file is damaged or "
                        "was saved from a diverged model")
    own = {k: v for k, v in bundle.model.state_dict().items() if not k.startswith(prefix)}
    # BatchNorm's step counter is bookkeeping, not weights: files saved without it still fit.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing from the file: {show(missing)}")
        if unexpected:
            parts.append(f"not in the model: {show(unexpected)}")
        if wrong_shape:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]
            parts.append("shape differs: " + show(shapes))
        raise UserError(
            f"--weights {path} does not fit {bundle.source} model '{bundle.arch}' "
            f"(classifier '{bundle.head}' excluded): " + "; ".join(parts)
        )
    bundle.model.load_state_dict(state, strict=False)


def replace_head(bundle: ModelBundle, num_classes: int) -> None:
    if bundle.source == "timm":
        bundle.model.reset_classifier(num_classes)
        classifier = bundle.model.get_classifier()
        bundle.head = next(n for n, m in bundle.model.named_modules() if m is classifier)
        return
    parent, attr = _module_parent(bundle.model, bundle.head)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def create_model(name: str, num_classes: int, *, pretrained: bool = False, weights: str | Path | None = None,
                 image_size: int | None = None, drop_path: float | None = None) -> ModelBundle:
    """`image_size` matters only to architectures built for one input size (ViTs); `drop_path` is the
    stochastic depth rate, where the architecture has it."""
    source, arch = resolve_name(name)
    if source == "transferbench":
        if pretrained or weights:
            raise UserError("simple_cnn has no pretrained weights: use --no-pretrained (strategy scratch or full)")
        if drop_path is not None:
            raise UserError("--drop-path: simple_cnn has no stochastic depth")
        return ModelBundle(SimpleCNN(num_classes), "classifier", data_config(name), source, arch)
    bundle = (_torchvision if source == "torchvision" else _timm)(arch, pretrained, image_size, drop_path)
    if weights:
        load_backbone_weights(bundle, weights)
    replace_head(bundle, num_classes)
    return bundle


def check_input_size(bundle: ModelBundle, image_size: int, device: torch.device) -> None:
    """One tiny forward pass at the run's resolution, so a size the architecture cannot take is a clear
    error now rather than a shape error from deep inside the model later."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.inference_mode():
            bundle.model(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as err:
        raise UserError(f"{bundle.source} model '{bundle.arch}' cannot take {image_size}x{image_size} input "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"choose another --image-size (its weights expect {bundle.data_config.input_size})") from None
    finally:
        bundle.model.train(was_training)
