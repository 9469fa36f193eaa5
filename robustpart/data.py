"""Evaluation and calibration data: Fashion-MNIST (Debian idx files or a bundled slice). Image folders are
read by evaldata.py.

Only numpy and the standard library are imported here; torch/torchvision are imported inside the
functions that need them, so a board-side install can still use `normalize` and the bundled slice.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .spec import InputSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049

_SLICE_PATH = Path(__file__).resolve().parent / "assets" / "fashion_mnist_slice.npz"
SLICE_EVAL_SIZE = 2000
SLICE_CALIB_SIZE = 512

_HOW_TO_GET = "install it with `apt-get install dataset-fashion-mnist` or pass --data PATH"


@dataclass
class EvalData:
    """A labelled evaluation set, already normalised for the model: images (N, C, H, W) float32."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self):
        if self.images.ndim != 4:
            raise DataError(f"evaluation images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} evaluation images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def _find_idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        candidate = root / name
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}(.gz) is missing in {root}; {_HOW_TO_GET}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path} ({exc}); {_HOW_TO_GET}") from exc
    if len(raw) < 8:
        raise DataError(f"{path} is truncated (only {len(raw)} bytes); {_HOW_TO_GET}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path} has magic number {found}, expected {magic}: not a Fashion-MNIST idx file; "
                        f"{_HOW_TO_GET}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path} holds {len(raw) - offset} data bytes but its header says {expected}; "
                        f"the file is corrupt; {_HOW_TO_GET}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str, root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" or "test") as uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = FASHION_MNIST_DIR if root is None else Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} does not exist; {_HOW_TO_GET}")
    prefix = _SPLIT_PREFIX[split]
    images = _read_idx(_find_idx_file(root, f"{prefix}-images-idx3-ubyte"), _IMAGES_MAGIC)
    labels = _read_idx(_find_idx_file(root, f"{prefix}-labels-idx1-ubyte"), _LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, "
                        f"labels {labels.shape}; {_HOW_TO_GET}")
    return images.copy(), labels.astype(np.int64)


def _load_slice() -> np.lib.npyio.NpzFile:
    if not _SLICE_PATH.is_file():
        raise DataError(f"the bundled Fashion-MNIST slice {_SLICE_PATH} is missing; regenerate it with "
                        f"`uv run python robustpart/assets/make_slice.py` (needs dataset-fashion-mnist)")
    return np.load(_SLICE_PATH)


def bundled_eval_slice() -> tuple[np.ndarray, np.ndarray]:
    """The first 2000 Fashion-MNIST test images (uint8 (N, 28, 28)) and labels (int64), shipped in the package."""
    with _load_slice() as data:
        return data["eval_images"].copy(), data["eval_labels"].astype(np.int64)


def bundled_calibration(n: int, seed: int = 0) -> np.ndarray:
    """The first `n` of 512 unlabelled Fashion-MNIST train images (uint8 (n, 28, 28)) shipped in the package.

    The stored images were drawn from the train split with a fixed seed when the slice was built. With
    the default seed=0 the first `n` stored images are returned; any other seed returns a different
    (deterministic) subset of `n` of the 512 stored images.
    """
    n = int(n)
    if n < 1:
        raise DataError(f"calibration needs at least 1 image, got n={n}")
    if n > SLICE_CALIB_SIZE:
        raise DataError(f"the bundled calibration set holds only {SLICE_CALIB_SIZE} images but {n} were asked "
                        f"for; ask for at most {SLICE_CALIB_SIZE} or calibrate from the full train split "
                        f"(load_fashion_mnist('train'))")
    with _load_slice() as data:
        stored = data["calib_images"]
        if seed:
            return stored[np.sort(np.random.default_rng(seed).permutation(len(stored))[:n])].copy()
        return stored[:n].copy()


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) scaled to [0, 1] then (x - mean) / std."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise DataError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    channels = spec.shape[0]
    if images.shape[1] != channels:
        raise DataError(f"images have {images.shape[1]} channels but the model expects {channels}")
    if tuple(images.shape[2:]) != tuple(spec.shape[1:]):
        raise DataError(f"images are {images.shape[2]}x{images.shape[3]} but the model expects "
                        f"{spec.shape[1]}x{spec.shape[2]}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.astype(np.float32) / np.float32(255.0)
    return ((x - mean) / std).astype(np.float32, copy=False)
