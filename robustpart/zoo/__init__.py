"""Reference model zoo: reduced-width torchvision CNNs trained on Fashion-MNIST, with committed checkpoints.

    from robustpart.zoo import load_reference, FMNIST_SPEC
    model = load_reference("fmnist_vgg16_bn")      # eval mode, trained weights

Importing this package does not import torch; `build` and `load_reference` do.
Checkpoints live in robustpart/zoo/checkpoints/NAME.pt (fp32 state_dict) with a NAME.json training
record; `uv run python -m robustpart.zoo.train NAME` recreates them (see MODEL_CARD.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..data import FASHION_MNIST_LABELS
from ..errors import ModelError, WeightsError
from ..spec import InputSpec

FMNIST_SPEC = InputSpec(shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,), num_classes=10,
                        labels=FASHION_MNIST_LABELS)


@dataclass(frozen=True)
class ReferenceModel:
    """One zoo entry: `builder` is the name of the function in robustpart.zoo.models."""

    name: str
    builder: str
    torchvision_class: str
    summary: str
    spec: InputSpec = FMNIST_SPEC


REFERENCE_MODELS: dict[str, ReferenceModel] = {m.name: m for m in (
    ReferenceModel("fmnist_vgg16_bn", "fmnist_vgg16_bn", "torchvision.models.vgg.VGG",
                   "VGG16-BN: 13 conv-BN-ReLU (16..128 wide), 4 max-pools, 3 linear layers"),
    ReferenceModel("fmnist_resnet18", "fmnist_resnet18", "torchvision.models.resnet.ResNet",
                   "ResNet-18: BasicBlock x [2, 2, 2, 2], widths 16, 32, 64, 128, 3x3 stride-1 stem"),
    ReferenceModel("fmnist_alexnet", "fmnist_alexnet", "torchvision.models.alexnet.AlexNet",
                   "AlexNet: 5 conv-ReLU (no BN), 3 max-pools, dropout + 3 linear layers"),
    ReferenceModel("fmnist_mobilenet_v2", "fmnist_mobilenet_v2", "torchvision.models.mobilenetv2.MobileNetV2",
                   "MobileNetV2 width 0.5: stride-2 stem, 17 InvertedResidual blocks, total stride 8"),
    ReferenceModel("fmnist_convnext", "fmnist_convnext", "torchvision.models.convnext.ConvNeXt",
                   "ConvNeXt: 2x2 patchify stem, 3 stages of 2 CNBlocks (32, 64, 128 channels)"),
)}


def reference_names() -> list[str]:
    return list(REFERENCE_MODELS)


def _entry(name: str) -> ReferenceModel:
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        raise ModelError(f"unknown reference model {name!r}; available: {', '.join(REFERENCE_MODELS)}") from None


def checkpoint_dir() -> Path:
    return Path(str(resources.files(__name__) / "checkpoints"))


def checkpoint_path(name: str) -> Path:
    _entry(name)
    return checkpoint_dir() / f"{name}.pt"


def train_command(name: str) -> str:
    return f"uv run python -m robustpart.zoo.train {name}"


def build(name: str):
    """The untrained model (torchvision class, freshly initialised, train mode)."""
    entry = _entry(name)
    from . import models

    return getattr(models, entry.builder)()


def load_reference(name: str):
    """The reference model with its committed Fashion-MNIST weights, in eval mode."""
    path = checkpoint_path(name)
    if not path.is_file():
        raise WeightsError(f"no checkpoint for {name} at {path}; train it with `{train_command(name)}`")
    import torch

    model = build(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt/partial file
        raise WeightsError(f"cannot read checkpoint {path} ({exc}); retrain it with `{train_command(name)}`") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(f"checkpoint {path} does not match the {name} architecture ({first}); "
                           f"retrain it with `{train_command(name)}`") from exc
    return model.eval()


def training_record(name: str) -> dict:
    """The JSON record written next to the checkpoint by robustpart.zoo.train ({} if absent)."""
    path = checkpoint_path(name).with_suffix(".json")
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


__all__ = ["FMNIST_SPEC", "REFERENCE_MODELS", "ReferenceModel", "build", "checkpoint_path", "load_reference",
           "reference_names", "training_record"]
