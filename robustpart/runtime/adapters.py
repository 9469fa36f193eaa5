"""Fitted skip / exit adapters (skips.py) as plain arrays: what a bundle stores and a board loads."""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError


@dataclass
class AdapterSet:
    """Fitted adapters by (source cut, target cut): weight [C_t, features] and bias [C_t] (float32); and, per
    failure set, the cut whose early exit answers instead of the route through the live blocks, where that
    agreed better with the healthy model on the calibration images (skips.choose_exits)."""

    weights: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    biases: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    exit_for: dict[frozenset, int] = field(default_factory=dict)

    def bytes_of(self, pair: tuple[int, int]) -> int:
        return int(self.weights[pair].nbytes + self.biases[pair].nbytes)

    def to_bytes(self) -> bytes:
        arrays = {}
        for (j, t), w in self.weights.items():
            arrays[f"{j}-{t}/weight"], arrays[f"{j}-{t}/bias"] = w, self.biases[(j, t)]
        for failed, j in self.exit_for.items():
            arrays["exit_for/" + "-".join(map(str, sorted(failed)))] = np.asarray(j, dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "AdapterSet":
        out = cls()
        try:
            with np.load(io.BytesIO(data)) as z:
                for key in z.files:
                    head, part = key.split("/")
                    if head == "exit_for":
                        out.exit_for[frozenset(int(b) for b in part.split("-"))] = int(z[key])
                        continue
                    pair = tuple(int(v) for v in head.split("-"))
                    (out.weights if part == "weight" else out.biases)[pair] = z[key].astype(np.float32)
        except (ValueError, OSError, KeyError) as exc:
            raise BundleError(f"the adapter data is malformed ({exc}); compile the bundle again") from exc
        return out


ADAPTER_DATA, ADAPTER_INFO = "adapters.npz", "adapters.json"


@dataclass(frozen=True)
class AdapterEntry:
    """adapters.json: the adapter data file, its SHA-256, and per adapter who holds it and its bytes."""

    file: str
    sha256: str
    pairs: tuple[dict, ...]          # {"source": j, "target": t, "boards": [...], "bytes": n}
    info: dict                       # calibration images, seed, seconds, synthesized, bytes

    def board_bytes(self, board: int) -> int:
        return sum(p["bytes"] for p in self.pairs if board in p["boards"])

    def load(self, root: Path) -> AdapterSet:
        path = Path(root) / self.file
        if not path.resolve().is_relative_to(Path(root).resolve()):
            raise BundleError(f"adapter file {self.file!r} points outside the bundle directory; compile again")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read the adapter data {path}: {exc}; compile the bundle again") from exc
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise BundleError(f"{path} does not match the SHA-256 in {ADAPTER_INFO}: the file was changed or "
                              f"damaged; compile the bundle again")
        return AdapterSet.from_bytes(data)

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "pairs": list(self.pairs), **self.info}

    @classmethod
    def from_json(cls, d: dict) -> "AdapterEntry":
        info = {k: v for k, v in d.items() if k not in ("file", "sha256", "pairs")}
        return cls(str(d["file"]), str(d["sha256"]), tuple(dict(p) for p in d["pairs"]), info)


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_rows(x: np.ndarray, target_shape: tuple[int, ...], in_features: int) -> np.ndarray:
    """numpy twin of adapter_ops.pool_to: to a feature map, x [N, C, H, W] average-pooled to its spatial size
    as rows [N * H_t * W_t, C]; to a flat target, pooled to a g x g grid (g^2 = in_features / C), flattened."""
    if x.ndim == 4:
        if len(target_shape) == 3:
            h, w = target_shape[1:]
        else:
            h = w = math.isqrt(in_features // x.shape[1])
        rows_h, cols_w = _windows(x.shape[2], h), _windows(x.shape[3], w)
        pooled = np.empty((x.shape[0], x.shape[1], h, w), dtype=np.float32)
        for i, (a, b) in enumerate(rows_h):
            for j, (c, d) in enumerate(cols_w):
                pooled[:, :, i, j] = x[:, :, a:b, c:d].mean(axis=(2, 3))
        if len(target_shape) == 3:
            return pooled.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
        return pooled.reshape(x.shape[0], -1)
    if x.ndim == 2 and len(target_shape) == 1:
        return x
    raise BundleError(f"no adapter from a tensor of shape {list(x.shape[1:])} to {list(target_shape)}")


def rebuild_cut(adapters: AdapterSet | None, source: int, target: int, x: np.ndarray,
                target_shape: tuple[int, ...]) -> np.ndarray:
    """Cut `target` rebuilt from `x`, cut `source`, by the adapter (source, target), or zeros where
    `adapters` has none (no adapters, --skip none, or one this board does not hold)."""
    pair = (source, target)
    if adapters is None or pair not in adapters.weights:
        return np.zeros((len(x), *target_shape), np.float32)
    return apply_adapter(x, adapters.weights[pair], adapters.biases[pair], target_shape)


def apply_adapter(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """The adapter (pooling, then the 1x1 convolution / linear map) on a batch, as skips.apply_adapter."""
    rows = pool_rows(np.asarray(x, dtype=np.float32), target_shape, weight.shape[1]) @ weight.T + bias
    if len(target_shape) == 3:
        _, h, w = target_shape
        return np.ascontiguousarray(rows.reshape(x.shape[0], h, w, -1).transpose(0, 3, 1, 2), dtype=np.float32)
    return rows.astype(np.float32, copy=False)
