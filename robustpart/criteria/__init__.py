"""Data-driven importance criteria, registered with `robustpart.scores` on import:

- `taylor` (Algorithm 1, line 8): first-order sensitivity of the output to each channel's weights;
- `jsd` (line 9): how much the output distribution moves when a channel is removed, exactly by ablation
  or fast, by linearising the logits around the complete output (gradients.py).
"""
from . import jsd, taylor  # noqa: F401  (registration)
