"""Which torch device the compiler's torch code runs on: `--torch-device auto|cpu|cuda`."""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

TORCH_DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`: CUDA when this torch build sees a GPU, else the CPU. `cuda` without a usable GPU is an error,
    not a silent fall back: the user asked for it."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--torch-device {name}: this torch build sees no CUDA GPU; use "
                                  f"--torch-device cpu (or auto)")
        return torch.device(name)
    raise ConfigError(f"unknown --torch-device '{name}'; choose one of {', '.join(TORCH_DEVICES)}")


@contextlib.contextmanager
def module_on(module: torch.nn.Module, device: torch.device):
    """Run `module` on `device` for the duration (the CPU copy is what the compiler exports and hashes)."""
    if device.type == "cpu":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
