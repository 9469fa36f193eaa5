"""What robustpart knows about each kind of op, in one table per op kind.

A *unit rule* says how a conv/linear whose output channels are split computes only some of them; a
*chain rule* says when a module that follows it is channel-local (channel c of its output reads only
channel c of its input, for a channel axis) and how it is restricted to some channels; the *function
rules* say which functions and tensor methods are channel-local. The tracer (graph.py) grows units with
these rules; the ONNX emitter (shards.py) slices modules with them.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _identity_at_eval_types() -> tuple[type, ...]:
    from torchvision.ops import StochasticDepth
    return (StochasticDepth,)


# ---- units: the conv/linear layers whose output channels are split ---------------------------------------

class GatherConv(nn.Module):
    """The kept output channels of a grouped conv: gather each one's input group, then one group each."""

    def __init__(self, conv: nn.Conv2d, keep: np.ndarray):
        super().__init__()
        in_per_group = conv.in_channels // conv.groups
        out_per_group = conv.out_channels // conv.groups
        groups = keep // out_per_group
        gather = (groups[:, None] * in_per_group + np.arange(in_per_group)[None, :]).reshape(-1)
        self.register_buffer("gather", torch.as_tensor(gather, dtype=torch.int64))
        self.conv = nn.Conv2d(len(keep) * in_per_group, len(keep), conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, groups=len(keep), bias=conv.bias is not None,
                              padding_mode=conv.padding_mode)
        _copy_rows(conv, self.conv, keep)

    def forward(self, x):
        return self.conv(torch.index_select(x, 1, self.gather))


def _copy_rows(src: nn.Module, dst: nn.Module, keep: np.ndarray) -> nn.Module:
    idx = torch.as_tensor(keep)
    dst.weight.data = src.weight.data[idx].clone()
    if src.bias is not None:
        dst.bias.data = src.bias.data[idx].clone()
    return dst.eval()


def _slice_linear(mod: nn.Linear, keep: np.ndarray) -> nn.Module:
    return _copy_rows(mod, nn.Linear(mod.in_features, len(keep), bias=mod.bias is not None), keep)


def _slice_conv(mod: nn.Conv2d, keep: np.ndarray) -> nn.Module:
    if mod.groups != 1:
        return GatherConv(mod, keep).eval()
    new = nn.Conv2d(mod.in_channels, len(keep), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    bias=mod.bias is not None, padding_mode=mod.padding_mode)
    return _copy_rows(mod, new, keep)


@dataclass(frozen=True)
class UnitRule:
    kind: str                                       # "conv" or "linear"
    module_type: type
    channels: Callable[[nn.Module], int]            # number of output channels
    axis: Callable[[int], int]                      # channel axis of the output, from its number of dims
    slice: Callable[[nn.Module, np.ndarray], nn.Module]


UNIT_RULES = (
    UnitRule("conv", nn.Conv2d, lambda m: m.out_channels, lambda ndim: 1, _slice_conv),
    UnitRule("linear", nn.Linear, lambda m: m.out_features, lambda ndim: ndim - 1, _slice_linear),
)
UNSUPPORTED_WEIGHTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)     # refused with a clear message
FUNCTIONAL_WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose2d}


def unit_rule(mod: nn.Module) -> UnitRule | None:
    return next((r for r in UNIT_RULES if isinstance(mod, r.module_type)), None)


# ---- chain modules: channel-local ops after a unit ---------------------------------------------------------

def _unchanged(mod: nn.Module, keep: np.ndarray) -> nn.Module:
    return mod


def _slice_batchnorm(mod: nn.Module, keep: np.ndarray) -> nn.Module:
    idx = torch.as_tensor(keep)
    new = copy.deepcopy(mod)
    new.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(mod, name) is not None:
            setattr(new, name, nn.Parameter(getattr(mod, name).data[idx].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(mod, name) is not None:
            setattr(new, name, getattr(mod, name)[idx].clone())
    return new.eval()


def _slice_depthwise(mod: nn.Conv2d, keep: np.ndarray) -> nn.Module:
    new = nn.Conv2d(len(keep), len(keep), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    groups=len(keep), bias=mod.bias is not None, padding_mode=mod.padding_mode)
    return _copy_rows(mod, new, keep)


def _is_depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels


@dataclass(frozen=True)
class ChainRule:
    name: str
    matches: Callable[[nn.Module], bool]
    any_axis: bool                                  # channel-local on any axis, else only on axis 1 (N, C, ...)
    slice: Callable[[nn.Module, np.ndarray], nn.Module]


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout,
)
POOLING_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

CHAIN_RULES = (
    ChainRule("elementwise", lambda m: isinstance(m, ELEMENTWISE_MODULES + _identity_at_eval_types()),
              True, _unchanged),
    ChainRule("prelu (one shared slope)", lambda m: isinstance(m, nn.PReLU) and m.num_parameters == 1, True,
              _unchanged),
    ChainRule("batchnorm", lambda m: isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)), False, _slice_batchnorm),
    ChainRule("pooling", lambda m: isinstance(m, POOLING_MODULES), False, _unchanged),
    ChainRule("depthwise conv", _is_depthwise, False, _slice_depthwise),
)


def chain_rule(mod: nn.Module, axis: int) -> ChainRule | None:
    """The rule that makes `mod` channel-local on channel axis `axis`, or None."""
    return next((r for r in CHAIN_RULES if r.matches(mod) and (r.any_axis or axis == 1)), None)


def slice_chain_module(mod: nn.Module, keep: np.ndarray) -> nn.Module:
    """A channel-local module of a unit's chain restricted to channels `keep`."""
    rule = next((r for r in CHAIN_RULES if r.matches(mod)), None)
    if rule is None:
        raise ValueError(f"internal: {type(mod).__name__} is in a chain but has no chain rule")
    return rule.slice(mod, keep)


def slice_constant(value: torch.Tensor, channels: int, keep: np.ndarray) -> torch.Tensor:
    """A per-channel constant a chain reads (e.g. layer scale, shape (C, 1, 1)) restricted to `keep`."""
    dims = [d for d, s in enumerate(value.shape) if s == channels]
    if value.numel() <= 1 or not dims:
        return value
    return torch.index_select(value, dims[0], torch.as_tensor(keep)).clone()


# ---- functions and tensor methods ----------------------------------------------------------------------

ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.sigmoid, F.tanh, torch.nn.functional.dropout2d,
}
AXIS1_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
PERMUTES = {torch.permute, "permute"}
# x (op) c with a per-channel constant c; c / x and c - x are per-channel too, but are kept out of chains
ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add,
              torch.sub, torch.div, "mul", "add", "sub", "div"}
NON_COMMUTATIVE = {operator.truediv, torch.div, "div", operator.sub, torch.sub, "sub"}
