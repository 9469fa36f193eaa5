"""The adapter of a skip hyperconnection or early exit as torch ops (the simulator applies it, skips.py
fits it); runtime.adapters has its numpy twin for the executor and the boards."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXIT_FEATURES = 1024     # an exit from a feature map pools it to the largest grid with at most this many values


def exit_grid(source_shape: tuple[int, ...]) -> int:
    """The side of the grid an exit pools a [C, H, W] source to (1: global pooling)."""
    c, h, w = source_shape
    return max(1, min(h, w, math.isqrt(EXIT_FEATURES // c)))


def pool_to(x: torch.Tensor, target_shape: tuple[int, ...], in_features: int | None = None) -> torch.Tensor:
    """The adapter's input rows. To a feature map [C_t, H_t, W_t]: x [N, C, H, W] average-pooled to
    (H_t, W_t), rows [N * H_t * W_t, C] with the channels last. To a flat target (an exit, a linear layer's
    input): x pooled to a g x g grid (g^2 = in_features / C; default exit_grid) and flattened, [N, C g^2]."""
    if x.dim() == 4 and len(target_shape) == 3:
        pooled = F.adaptive_avg_pool2d(x, target_shape[1:])
        return pooled.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 4 and len(target_shape) == 1:
        grid = exit_grid(tuple(x.shape[1:])) if in_features is None else math.isqrt(in_features // x.shape[1])
        return F.adaptive_avg_pool2d(x, (grid, grid)).flatten(1)
    if x.dim() == 2 and len(target_shape) == 1:
        return x
    raise ValueError(f"no adapter from a tensor of shape {list(x.shape[1:])} to {list(target_shape)}")


def adapter_supported(source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    if len(source_shape) == 3 and len(target_shape) == 3:
        return source_shape[1] >= target_shape[1] and source_shape[2] >= target_shape[2]
    return len(target_shape) == 1 and len(source_shape) in (1, 3)


def apply_adapter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  target_shape: tuple[int, ...]) -> torch.Tensor:
    rows = pool_to(x, target_shape, weight.shape[1]) @ weight.T + bias
    if len(target_shape) == 3:
        _, h, w = target_shape
        return rows.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
    return rows
