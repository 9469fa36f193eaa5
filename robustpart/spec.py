"""What a model expects as input: shape, normalisation, number of classes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError


@dataclass(frozen=True)
class InputSpec:
    """Per-image input of a classifier: `shape` is (C, H, W); pixels in [0, 1] are normalised
    channel-wise as (x - mean) / std before the model sees them."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None      # None: not given; `models.load_model` reads it from the model's output
    dtype: str = "float32"
    labels: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise DataError(f"input shape must be C,H,W with positive sizes, got {self.shape}")
        channels = self.shape[0]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise DataError(
                    f"{name} has {len(values)} values but the input has {channels} channels; "
                    f"give one value or one per channel")
        if any(s <= 0 for s in self.std):
            raise DataError(f"std must be positive, got {self.std}")
        if self.num_classes is not None and self.num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {self.num_classes}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InputSpec":
        try:
            return cls(shape=tuple(int(s) for s in data["shape"]),
                       mean=tuple(float(m) for m in data["mean"]),
                       std=tuple(float(s) for s in data["std"]),
                       num_classes=int(data["num_classes"]),
                       dtype=str(data.get("dtype", "float32")),
                       labels=tuple(data.get("labels", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"input spec is malformed ({exc!r}); it needs shape, mean, std, num_classes") from exc

    @classmethod
    def load(cls, path: Path) -> "InputSpec":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read input spec {path}: {exc}") from exc


IMAGENET_SPEC = InputSpec(shape=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), num_classes=1000)
