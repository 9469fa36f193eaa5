"""Importance criteria (declared by name in `robustpart.policies.CRITERIA`) and `compute_scores`:

- `l1` (Algorithm 1, line 7): the magnitude of each output channel's weights;
- `taylor` (line 8): first-order sensitivity of the output to each channel's weights;
- `jsd` (line 9): how much the output distribution moves when a channel is removed, exactly by ablation
  or fast, by linearising the logits around the complete output (gradients.py).
"""
from .compute import compute_scores, register_criterion

__all__ = ["compute_scores", "register_criterion"]
