"""The adapter of a skip hyperconnection or early exit as torch ops (the simulator applies it, skips.py
fits it); runtime.adapters has its numpy twin for the executor and the boards."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to(x: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """x [N, C, H, W] or [N, C] brought to the target's spatial size: average pooling (global for a flat
    target); rows [N * H_t * W_t, C] with the channels last."""
    if x.dim() == 4 and len(target_shape) == 3:
        pooled = F.adaptive_avg_pool2d(x, target_shape[1:])
        return pooled.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() == 4 and len(target_shape) == 1:
        return x.mean(dim=(2, 3))
    if x.dim() == 2 and len(target_shape) == 1:
        return x
    raise ValueError(f"no adapter from a tensor of shape {list(x.shape[1:])} to {list(target_shape)}")


def adapter_supported(source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    if len(source_shape) == 3 and len(target_shape) == 3:
        return source_shape[1] >= target_shape[1] and source_shape[2] >= target_shape[2]
    return len(target_shape) == 1 and len(source_shape) in (1, 3)


def apply_adapter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  target_shape: tuple[int, ...]) -> torch.Tensor:
    rows = pool_to(x, target_shape) @ weight.T + bias
    if len(target_shape) == 3:
        _, h, w = target_shape
        return rows.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
    return rows
