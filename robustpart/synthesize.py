"""Data-free calibration: synthesize calibration images from a model's own BatchNorm statistics.

A trained BatchNorm layer remembers the per-channel mean and variance of its input over the training data
(`running_mean`, `running_var`). Starting from Gaussian noise in the normalised input space, the images
are optimised with Adam so that the batch statistics at every BN input match those running statistics
(ZeroQ, Cai et al. 2020, "distilled data"). From DeepInversion (Yin et al. 2020) come the optional
extras: cross-entropy towards random target classes, a total-variation and an l2 image prior, random
jitter and flips (see `SynthesisConfig`). They are off by default: on MobileNetV2 (benchmarks/bench_datafree.py)
cross-entropy 0.1 + jitter + flip matched the BN statistics 6x worse and lowered the compensated 2-failure
accuracy (86.8 % of the real-data figure against 92.4 % without). Gradients are taken with respect to the images only: the model's parameters and buffers are not
touched, and the model stays in eval mode, so its running statistics do not move.

Images are optimised one batch at a time, so memory is bounded by the batch (a backward pass keeps every
activation of the batch alive); the result is deterministic for a seed on the CPU.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import ACTIVATION_BUDGET, batch_size_for
from .device import resolve_device
from .errors import DataError
from .graph import ModelGraph, _tensor_shape

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 128           # measured default: reused for the scores and the compensation (bench_datafree)
MAX_SYNTH_BATCH = 128          # a larger batch adds no statistical benefit to the per-batch BN matching
BACKWARD_COPIES = 3            # a backward pass holds each activation, its gradient and some scratch


@dataclass(frozen=True)
class SynthesisConfig:
    """How the images are optimised. Loss = BN-statistics term (ZeroQ) + ce * cross-entropy towards random
    targets + tv * total variation + l2 * mean squared pixel (DeepInversion's priors)."""

    iterations: int = 200          # 100 (with 64 images) lost 10 % of VGG16-BN's 2-failure accuracy
    lr: float = 0.25               # Adam on the normalised pixels (DeepInversion uses 0.25, ZeroQ 0.5)
    ce: float = 0.0                # weight of the cross-entropy towards random target classes
    tv: float = 0.0                # weight of the (squared) total-variation prior
    l2: float = 0.0                # weight of the l2 prior on the normalised pixels
    jitter: float = 0.0            # random shift of up to this fraction of the image size per step
    flip: bool = False             # random horizontal flip per step
    clamp: bool = True             # keep the pixels in the valid range [0, 1] before normalisation


DEFAULT_CONFIG = SynthesisConfig()


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers with running statistics (the ones whose statistics can be inverted)."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def has_batchnorm(graph: ModelGraph) -> bool:
    return bool(batchnorm_layers(graph.module))


def _backward_bytes_per_image(graph: ModelGraph) -> int:
    """Bytes one image's activations take during a backward pass (every traced tensor is kept)."""
    total = 0
    for node in graph.module.graph.nodes:
        shape = _tensor_shape(node)
        if shape:
            total += 4 * math.prod(int(s) for s in shape[1:])
    return max(total, 1)


def default_synthesis_batch(graph: ModelGraph) -> int:
    """The evaluation default, capped so that a backward pass over the batch fits the activation budget."""
    fits = ACTIVATION_BUDGET // (BACKWARD_COPIES * _backward_bytes_per_image(graph))
    return max(1, min(batch_size_for(graph, None), MAX_SYNTH_BATCH, fits))


def _pixel_bounds(graph: ModelGraph, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised values of pixels 0 and 1, per channel, shaped (1, C, 1, 1)."""
    spec = graph.input_spec
    channels = spec.shape[0]
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).expand(channels)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).expand(channels)
    return ((0 - mean) / std).view(1, -1, 1, 1), ((1 - mean) / std).view(1, -1, 1, 1)


class _BNStatistics:
    """Forward pre-hooks recording, per BN layer, the mismatch between the batch statistics of its input
    and its running statistics (ZeroQ's loss: squared error of mean and of standard deviation, averaged
    over channels, then over layers)."""

    def __init__(self, layers: list[nn.modules.batchnorm._BatchNorm]):
        self.layers = layers
        self.terms: list[torch.Tensor] = []
        self.handles = [layer.register_forward_pre_hook(self._hook) for layer in layers]

    def _hook(self, layer, inputs) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        std = torch.sqrt(var + layer.eps)
        target_std = torch.sqrt(layer.running_var + layer.eps)
        self.terms.append(((mean - layer.running_mean) ** 2).mean() + ((std - target_std) ** 2).mean())

    def take(self) -> torch.Tensor:
        """The loss of the last forward pass (and reset for the next one)."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def bn_mismatch(graph: ModelGraph, images: torch.Tensor, batch_size: int | None = None) -> float:
    """ZeroQ's BN-statistics loss of `images` (mean over batches): how far their statistics at every BN
    input are from the running statistics. Lower is closer to the training data the model remembers."""
    module = graph.module
    layers = batchnorm_layers(module)
    if not layers:
        raise DataError(f"model {graph.name} has no BatchNorm layer: no statistics to compare with")
    batch_size = batch_size or default_synthesis_batch(graph)
    stats = _BNStatistics(layers)
    losses = []
    try:
        with torch.no_grad(), _eval_mode(module):
            for start in range(0, len(images), batch_size):
                module(images[start:start + batch_size])
                losses.append(stats.take().item())
    finally:
        stats.remove()
    return float(sum(losses) / len(losses))


class _eval_mode:
    """Eval mode for the block (BN must use, and not update, its running statistics), restored after."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """n split into near-equal batches of at most batch_size (no tiny last batch with noisy statistics)."""
    count = -(-n // batch_size)
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def _augment(x: torch.Tensor, config: SynthesisConfig, generator: torch.Generator) -> torch.Tensor:
    """DeepInversion's jitter (a random roll) and flip, the same for the whole batch."""
    if config.jitter > 0:
        max_h = int(round(config.jitter * x.shape[-2]))
        max_w = int(round(config.jitter * x.shape[-1]))
        dh = int(torch.randint(-max_h, max_h + 1, (1,), generator=generator))
        dw = int(torch.randint(-max_w, max_w + 1, (1,), generator=generator))
        x = torch.roll(x, shifts=(dh, dw), dims=(-2, -1))
    if config.flip and bool(torch.rand(1, generator=generator) < 0.5):
        x = torch.flip(x, dims=(-1,))
    return x


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def _optimise_batch(module: nn.Module, stats: _BNStatistics, x: torch.Tensor, targets: torch.Tensor,
                    bounds: tuple[torch.Tensor, torch.Tensor], config: SynthesisConfig,
                    generator: torch.Generator, say: Callable[[int, float], None]) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    # cosine decay, as DeepInversion: large early steps, fine matching at the end
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.iterations)
    for it in range(config.iterations):
        optimiser.zero_grad(set_to_none=True)
        logits = module(_augment(x, config, generator))
        bn_loss = stats.take()
        loss = bn_loss
        if config.ce:
            loss = loss + config.ce * F.cross_entropy(logits, targets)
        if config.tv:
            loss = loss + config.tv * _total_variation(x)
        if config.l2:
            loss = loss + config.l2 * (x ** 2).mean()
        # gradient w.r.t. the images only: no parameter's .grad is written
        (x.grad,) = torch.autograd.grad(loss, [x])
        optimiser.step()
        schedule.step()
        if config.clamp:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
        say(it, bn_loss.item())
    return x.detach()


def synthesize_calibration(graph: ModelGraph, n: int, *, seed: int = 0, device: str | torch.device | None = None,
                           batch_size: int | None = None, progress: Callable[[str], None] | None = None,
                           config: SynthesisConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """`n` normalised calibration images (n, C, H, W), float32 on the CPU, synthesized from the
    BatchNorm statistics of `graph`'s model. Raises DataError for a model without BatchNorm."""
    if not isinstance(n, int) or n < 1:
        raise DataError(f"synthesis needs n >= 1 images, got {n}")
    if not has_batchnorm(graph):
        raise DataError(f"model {graph.name} has no BatchNorm layer, so no calibration images can be "
                        f"synthesized from it: pass --calib-data DIR, or score from the weights alone with "
                        f"--scores l1")
    device = resolve_device(device)
    module = graph.module if device.type == "cpu" else copy.deepcopy(graph.module).to(device)
    batch_size = batch_size or default_synthesis_batch(graph)
    sizes = _batch_sizes(n, batch_size)
    generator = torch.Generator().manual_seed(seed)      # CPU generator: the same draws on every device
    bounds = _pixel_bounds(graph, device)
    progress = progress or log.info
    stats = _BNStatistics(batchnorm_layers(module))
    out = []
    try:
        with _eval_mode(module):
            for b, size in enumerate(sizes):
                noise = torch.randn((size,) + tuple(graph.input_spec.shape), generator=generator)
                targets = torch.randint(0, graph.input_spec.num_classes, (size,), generator=generator)
                say = _reporter(progress, b, len(sizes), config.iterations)
                images = _optimise_batch(module, stats, noise.to(device), targets.to(device), bounds, config,
                                         generator, say)
                out.append(images.cpu())
    finally:
        stats.remove()
    return torch.cat(out).float()


def _reporter(progress: Callable[[str], None], batch: int, batches: int, iterations: int
              ) -> Callable[[int, float], None]:
    every = max(1, iterations // 4)

    def say(it: int, bn_loss: float) -> None:
        if it == 0 or (it + 1) % every == 0:
            progress(f"synthesis: batch {batch + 1}/{batches}, iteration {it + 1}/{iterations}, "
                     f"BN loss {bn_loss:.4f}")
    return say
