"""Labelled evaluation data as a stream of batches, so memory is bounded by the batch, not the data set.

Image folders are decoded by a torch `DataLoader` with worker processes (decoding overlaps compute);
Fashion-MNIST (idx files or the bundled slice) stays a small uint8 array that is normalised per batch.
`load_eval_data` concatenates a stream for callers that want one array (calibration: a few images).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from .errors import DataError
from .models import ModelSource, weights_transforms
from .spec import InputSpec

Batch = tuple[torch.Tensor, torch.Tensor]       # images float32 (B, C, H, W), labels int64 (B,)


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


class ArrayStream:
    """uint8 images (N, H, W) or (N, C, H, W) in memory, normalised for the model one batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: InputSpec, batch_size: int, source: str):
        self.images, self.labels, self.spec = images, np.asarray(labels, dtype=np.int64), spec
        self.batch_size, self.source = _checked_batch_size(batch_size), source

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self), self.batch_size):
            end = start + self.batch_size
            yield (torch.from_numpy(datasets.normalize(self.images[start:end], self.spec)),
                   torch.from_numpy(self.labels[start:end]))


class _CheckedImages(torch.utils.data.Dataset):
    """The images `indices` of an ImageFolder, with unreadable files and wrong transforms reported as
    DataError naming the file."""

    def __init__(self, folder, indices: list[int], shape: tuple[int, ...]):
        self.folder, self.indices, self.shape = folder, indices, tuple(shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, i = self.folder.samples[self.indices[i]][0], self.indices[i]
        try:
            image, label = self.folder[i]
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        if not isinstance(image, torch.Tensor):
            raise DataError("the image folder's transform must return a tensor (end it with ToTensor)")
        if tuple(image.shape) != self.shape:
            raise DataError(f"image {path} becomes {list(image.shape)} after the transform but the model "
                            f"expects {list(self.shape)}")
        return image.to(torch.float32), label


class FolderStream:
    """An ImageNet-style tree (one sub-folder per class, sorted order) through a DataLoader: the first
    `limit` images, or with `spread` `limit` images evenly spaced over the tree (every class, not the first few:
    for calibration)."""

    def __init__(self, path: Path, transform, spec: InputSpec, limit: int | None, batch_size: int,
                 workers: int, pin_memory: bool = False, spread: bool = False):
        folder = _image_folder(path, transform)
        count = len(folder) if limit is None else min(int(limit), len(folder))
        if count < 1:
            raise DataError(f"image folder {path} holds no images (limit={limit})")
        indices = (np.linspace(0, len(folder) - 1, count).round().astype(int).tolist() if spread
                   else list(range(count)))
        self.dataset = _CheckedImages(folder, indices, spec.shape)
        self.batch_size, self.workers = _checked_batch_size(batch_size), _checked_workers(workers)
        self.pin_memory = pin_memory
        self.source = f"image folder {path} ({count})"

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.workers, pin_memory=self.pin_memory)
        try:
            for images, labels in loader:
                yield images, labels.to(torch.int64)
        except DataError as exc:      # from a worker, the message carries the worker's traceback
            raise DataError(_worker_error_line(str(exc))) from None


def _worker_error_line(message: str) -> str:
    last = message.strip().splitlines()[-1]
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _image_folder(path: Path, transform):
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; pass a directory with one sub-folder per class")
    try:
        from torchvision.datasets import ImageFolder
    except ImportError as exc:
        raise DataError("reading an image folder needs torchvision; install robustpart[compiler]") from exc
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"image folder {path} holds no usable images ({exc}); it needs one sub-folder per "
                        f"class containing .jpg/.png files") from exc


def _checked_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"--batch-size must be an integer >= 1, got {batch_size}")
    return batch_size


def _checked_workers(workers: int) -> int:
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"--workers must be an integer >= 0 (0: decode in the main process), got {workers}")
    return workers


def open_eval_stream(spec: InputSpec, path: Path | str | None = None, limit: int | None = None,
                     source: ModelSource | None = None, batch_size: int = 256, workers: int | None = None,
                     pin_memory: bool = False, spread: bool = False) -> ArrayStream | FolderStream:
    """Labelled evaluation data for the model, in batches. `path` is a Fashion-MNIST idx folder, an
    ImageFolder tree, or "bundled" (the 2000-image Fashion-MNIST slice in the package); without it a
    1x28x28 model uses the Debian Fashion-MNIST test split if installed, else the bundled slice. `spread`:
    an image folder's `limit` images are spaced evenly over it instead of being its first ones."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"--limit must be an integer >= 1 (the first N images), got {limit}")
    workers = default_workers() if workers is None else workers
    if path is None or str(path) == "bundled":
        if tuple(spec.shape) != (1, 28, 28):
            raise DataError(f"no evaluation data for a {list(spec.shape)} input: pass --data DIR (an image "
                            f"folder with one sub-folder per class)")
        if path is None and datasets.FASHION_MNIST_DIR.is_dir():
            images, labels = datasets.load_fashion_mnist("test")
            name = f"fashion-mnist test ({datasets.FASHION_MNIST_DIR})"
        else:
            images, labels = datasets.bundled_eval_slice()
            name = "bundled fashion-mnist test slice"
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"data path {path} does not exist")
        if not any(path.glob("t10k-images-idx3-ubyte*")):
            return FolderStream(path, folder_transform(spec, source), spec, limit, batch_size, workers, pin_memory,
                                spread)
        images, labels = datasets.load_fashion_mnist("test", path)
        name = f"fashion-mnist test ({path})"
    images, labels = images[:limit], labels[:limit]
    if len(labels) == 0:
        raise DataError(f"{name} holds no images")
    return ArrayStream(images, labels, spec, batch_size, f"{name}, {len(labels)} images")


def load_eval_data(spec: InputSpec, path: Path | str | None = None, limit: int | None = None,
                   source: ModelSource | None = None, spread: bool = False) -> datasets.EvalData:
    """The whole stream as one float32 array: for a few images (calibration, tests), not a data set."""
    stream = open_eval_stream(spec, path, limit, source, workers=0, spread=spread)
    batches = list(stream)
    if not batches:
        raise DataError(f"{stream.source}: no images")
    images = torch.cat([b[0] for b in batches]).numpy()
    labels = torch.cat([b[1] for b in batches]).numpy()
    return datasets.EvalData(images, labels, stream.source)


class ResizeCrop:
    """The usual ImageNet evaluation resize (the short side to 256/224 of the input's) and centre crop,
    for images of another size than the model's input; an image of exactly that size is left as it is
    (zooming it by 256/224 and cropping would feed the model a distorted picture)."""

    def __init__(self, height: int, width: int):
        from torchvision import transforms as T
        self.size = (width, height)              # PIL's order
        self.resize_crop = T.Compose([T.Resize(int(round(min(height, width) * 256 / 224))),
                                      T.CenterCrop((height, width))])

    def __call__(self, image):
        return image if image.size == self.size else self.resize_crop(image)


def folder_transform(spec: InputSpec, source: ModelSource | None):
    """The weights' own transform for torchvision weights; otherwise the usual ImageNet evaluation
    transform at the model's input size (ResizeCrop), then normalise."""
    from torchvision import transforms as T
    own = weights_transforms(source) if source is not None else None
    if own is not None:
        return own
    channels, height, width = spec.shape
    steps = [ResizeCrop(height, width)]
    if channels == 1:
        steps.append(T.Grayscale(1))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def evaluation_arrays(data: datasets.EvalData) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(data.images)), torch.from_numpy(data.labels)
