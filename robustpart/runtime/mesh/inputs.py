"""Inputs for `robustpart run`: images normalised per the bundle's input spec (numpy; PIL only for folders).

    bundled        the 2000 Fashion-MNIST test images shipped with robustpart (28x28, 1 channel)
    FILE.npy       uint8 images (N, H, W) / (N, C, H, W), normalised here; or float32, used as given
    FILE.npz       the same under "images", with optional "labels"
    DIR            image files, or one sub-folder per class (labels = sorted folder index); resized to H x W
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...data import bundled_eval_slice, normalize
from ...errors import DataError
from ...spec import InputSpec
from ..manifest import Manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp"}


def input_spec(manifest: Manifest) -> InputSpec:
    return InputSpec(manifest.input.shape, manifest.input.mean, manifest.input.std, manifest.output.num_classes)


def load_inputs(source: str | Path, manifest: Manifest,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 (N, C, H, W) normalised images, int64 labels or None)."""
    spec = input_spec(manifest)
    labels = None
    if str(source) == "bundled":
        images, labels = bundled_eval_slice()
        if limit:
            images, labels = images[:limit], labels[:limit]
        x = normalize(images, spec)
    else:
        path = Path(source)
        if path.is_dir():
            x, labels = _folder(path, spec, limit)
        elif path.suffix in (".npy", ".npz") and path.is_file():
            try:
                data = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read {path}: {exc}") from exc
            if path.suffix == ".npz":
                if "images" not in data:
                    raise DataError(f"{path} has no 'images' array (it has {sorted(data.files)})")
                images, labels = data["images"], data["labels"] if "labels" in data else None
            else:
                images = data
            images = images[:limit] if limit else images
            labels = None if labels is None else np.asarray(labels[:len(images)], dtype=np.int64)
            x = normalize(images, spec) if images.dtype == np.uint8 else np.asarray(images, dtype=np.float32)
        else:
            raise DataError(f"input {source} is not 'bundled', a folder of images or a .npy/.npz file")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.shape):
        raise DataError(f"inputs have shape {list(x.shape)}; the bundle expects (N, {', '.join(map(str, spec.shape))})")
    if len(x) == 0:
        raise DataError(f"input {source} holds no images")
    return np.ascontiguousarray(x, dtype=np.float32), labels


def _folder(path: Path, spec: InputSpec, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("reading an image folder needs Pillow (pip install pillow), or pass a .npy file") from exc
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted(c.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    files = files[:limit] if limit else files
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    channels, height, width = spec.shape
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"the bundle expects {channels}-channel inputs; give them as a .npy file")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                pixels = np.asarray(im.convert(mode).resize((width, height)), dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read image {f}: {exc}") from exc
        images.append(pixels if channels == 1 else pixels.transpose(2, 0, 1))
    labels = None if classes == [] else np.asarray([label for _, label in files], dtype=np.int64)
    return normalize(np.stack(images), spec), labels
