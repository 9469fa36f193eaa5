"""Every policy robustpart looks up by name, with its help: the CLI's choices and the checks come from here.

Only names, help and where each implementation lives (imported on first use, see `registry.Registry`), so
this module, and the CLI's argument checks, import neither torch nor the implementations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError
from .registry import Registry

CRITERIA = Registry("importance criterion")
CRITERIA.declare("l1", path="robustpart.criteria.l1:l1_importance", help="sum of |weights|, no data")
CRITERIA.declare("taylor", path="robustpart.criteria.taylor:taylor_importance",
                 help="first-order output sensitivity", needs_data=True)
CRITERIA.declare("jsd", path="robustpart.criteria.jsd:jsd_importance",
                 help="output distribution shift when removed", needs_data=True)
DEFAULT_CRITERIA = ("l1", "taylor", "jsd")

PARTITIONERS = Registry("partitioning method")
PARTITIONERS.declare("robust", path="robustpart.partition:robust_partition",
                     help="RobustDiCE: cluster by importance, replicate, deal round-robin")
PARTITIONERS.declare("lop", path="robustpart.partition:lop_partition", help="contiguous even split")
PARTITIONERS.declare("full", path="robustpart.partition:full_partition", help="every channel on every board")
PARTITIONERS.declare("random", path="robustpart.partition:random_partition", help="random even split")
PARTITIONERS.declare("cdc", path="robustpart.partition:cdc_partition",
                     help="baseline for evaluate --compare: even split on N-1 boards + a parity board")

FILLS = Registry("fill policy")
FILLS.declare("zero", path="robustpart.fills:zero_fill", help="a lost channel reads as zeros")

COMPENSATION_AFFINES = ("adabn", "restore", "none")
COMPENSATION_FILLS = ("zero", "mean", "ls")
RECON_DTYPES = ("float32", "float16")


def index_dtype(n: int):
    """The smallest integer type for positions 0..n-1 of a sparse reconstruction."""
    import numpy as np
    return np.dtype(np.uint16 if n <= 1 << 16 else np.int32)


@dataclass(frozen=True)
class CompensationPolicy:
    """How compensation is fitted (see compensate.py): the affine at the pre-activation point and the fill
    of the lost channels at the exit."""
    affine: str = "adabn"
    fill: str = "ls"
    ridge: float = 1e-3        # relative to the mean variance of the surviving channels
    max_scale: float = 10.0    # bound on the affine's scale (a channel that died upstream has ~0 variance)
    max_recon_ratio: float = 1.0    # a unit's reconstruction matrix may take at most this fraction of the
                                    # unit's own parameter bytes (per failure set); above it: mean fill
    recon_dtype: str = "float32"    # how the reconstruction coefficients are stored: float32 or float16
    max_regressors: int = 0         # > 0: each lost channel regressed on at most this many surviving
                                    # channels (its most correlated), stored sparse; 0: on all of them

    def __post_init__(self):
        if self.affine not in COMPENSATION_AFFINES:
            raise ConfigError(f"unknown compensation affine '{self.affine}'; choose one of "
                              f"{', '.join(COMPENSATION_AFFINES)}")
        if self.fill not in COMPENSATION_FILLS:
            raise ConfigError(f"unknown compensation fill '{self.fill}'; choose one of "
                              f"{', '.join(COMPENSATION_FILLS)}")
        if self.recon_dtype not in RECON_DTYPES:
            raise ConfigError(f"unknown reconstruction dtype '{self.recon_dtype}'; choose one of "
                              f"{', '.join(RECON_DTYPES)}")
        if not isinstance(self.max_regressors, int) or self.max_regressors < 0:
            raise ConfigError(f"the regressors per lost channel must be an integer >= 0 (0: all), got "
                              f"{self.max_regressors!r}")

    def recon_bytes(self, n_lost: int, n_kept: int, stored: bool = True) -> int:
        """Bytes of a unit's reconstruction for `n_lost` lost and `n_kept` surviving channels, as stored, or
        (`stored=False`) with float32 coefficients: the size `max_recon_ratio` caps, so that float16 stores
        the same reconstructions in half the bytes rather than more of them."""
        item = 2 if stored and self.recon_dtype == "float16" else 4
        k = self.regressors(n_kept)
        return n_lost * k * (item + (index_dtype(n_kept).itemsize if k < n_kept else 0))

    def regressors(self, n_kept: int) -> int:
        """How many surviving channels each lost channel is regressed on."""
        return n_kept if self.max_regressors == 0 else min(self.max_regressors, n_kept)

    def to_json(self) -> dict:
        return asdict(self)


COMPENSATION = Registry("compensation policy")
COMPENSATION.register("ls", "affine + least-squares reconstruction of lost channels")(
    CompensationPolicy(affine="adabn", fill="ls"))
COMPENSATION.register("stats", "affine + mean fill")(CompensationPolicy(affine="adabn", fill="mean"))
DEFAULT_COMPENSATION = "ls"

JSD_MODES = Registry("JSD mode")
JSD_MODES.declare("auto", "exact when affordable")
JSD_MODES.declare("exact", "channel ablation")
JSD_MODES.declare("fast", "linearised logits")

EVAL_BACKENDS = Registry("evaluate backend")
EVAL_BACKENDS.declare("torch", "the failure simulator")
EVAL_BACKENDS.declare("onnx", "the bundle's shards in ONNX Runtime")

COMPENSATION_ROWS = Registry("compensation row choice")
COMPENSATION_ROWS.declare("both", "each method without and with compensation")
COMPENSATION_ROWS.declare("with", "")
COMPENSATION_ROWS.declare("without", "")


def criterion_needs_data(name: str) -> bool:
    return bool(CRITERIA.trait(name, "needs_data", False))
