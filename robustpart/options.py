"""What a compile is asked to do, and every default in one place (the CLI's help reads them from here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .routes import DEFAULT_BOARD_FAILURE, DEFAULT_SKIP_WEIGHTS  # noqa: F401 - with the other defaults

DEFAULT_DEVICES = 4
DEFAULT_THRESHOLD = 0.3          # robust: clustering distance in normalised score space
DEFAULT_METHOD = "robust"
DEFAULT_FILL = "zero"
DEFAULT_JSD_MODE = "auto"
DEFAULT_CALIB = 64               # calibration images for the data-driven scores
DEFAULT_COMPENSATE_CALIB = 256   # calibration images for compensation
DEFAULT_RECON_DTYPE = "float16"  # reconstruction coefficients: half the bytes of float32, the same accuracy on
                                 # every reference model (README, "Compact compensation")
DEFAULT_MODE = "horizontal"      # plan.MODES
BALANCES = ("params", "macs")    # pipeline / hybrid: what the cut points balance over the blocks
DEFAULT_BALANCE = "params"
DEFAULT_SKIP = "auto"            # pipeline / hybrid: plan.SKIPS, or auto = failover when calibration images
                                 # are at hand to fit the adapters, else none
SYNTHESIZE = "synthesize"        # --calib-data synthesize: images made from the model's BatchNorm statistics


@dataclass
class CompileOptions:
    devices: int = DEFAULT_DEVICES
    threshold: float | None = DEFAULT_THRESHOLD
    thresholds_file: Path | None = None
    method: str = DEFAULT_METHOD          # policies.PARTITIONERS
    criteria: tuple[str, ...] | None = None   # policies.CRITERIA; None: policies.DEFAULT_CRITERIA, or l1 alone
                                              # when there are no calibration images
    jsd: str = DEFAULT_JSD_MODE           # policies.JSD_MODES
    calib: int = DEFAULT_CALIB
    calib_data: Path | None = None        # an image folder, or SYNTHESIZE
    seed: int = 0
    replicate: list[str] = field(default_factory=list)
    align: int = 1                        # robust plans: each board's channels of a unit rounded up to a multiple
                                          # of this, with replicas of the most important channels it lacks
                                          # (partition.align_placement); 1: as the method gives them
    split_output: bool = False            # split the output layer too (default: whole on every board when it
                                          # is small, partition.output_unit_to_replicate)
    fill: str = DEFAULT_FILL              # policies.FILLS
    shards: bool = True                   # write per-board ONNX shards and manifest.json
    compensate: str = "auto"              # policies.COMPENSATION, "none", or "auto": the default policy when
                                          # calibration images are at hand, else none
    compensate_up_to: int | None = None   # largest failure set prepared (default: compensate.default_max_failures)
    compensate_calib: int = DEFAULT_COMPENSATE_CALIB
    compensate_dtype: str = DEFAULT_RECON_DTYPE    # how reconstruction coefficients are stored (policies.RECON_DTYPES)
    compensate_regressors: int = 0        # > 0: surviving channels each lost channel is rebuilt from (0: all)
    batch_size: int | None = None         # images per batch in scoring and compensation (default: batching.py)
    torch_device: str = "cpu"             # where scoring and compensation run: cpu, cuda or auto
    mode: str = DEFAULT_MODE              # horizontal, pipeline (a block per board) or hybrid (a block per group)
    balance: str = DEFAULT_BALANCE        # how pipeline / hybrid cut points are chosen, unless `cuts` names them
    cuts: list[str] | None = None         # units after which to cut (pipeline / hybrid)
    groups: str | None = None             # hybrid: "BxG", B blocks of G boards (default 2 x devices/2)
    skip: str = DEFAULT_SKIP              # pipeline / hybrid: skip hyperconnections around dead blocks
    skip_weights: str = DEFAULT_SKIP_WEIGHTS      # --skip always: ResiliNet's hyperconnection weights
    board_failure: float = DEFAULT_BOARD_FAILURE  # --skip always: the failure probability the weights use
    backups: int | None = None            # boards that store a copy of each board's shards, for a takeover
                                          # (runtime/takeover.py; None: every other board)
    memory_budget: float | None = None    # parameter bytes a board may hold after a takeover (<= 1: a fraction
                                          # of the model's); None: no limit
    wire: str = "fp32"                    # runtime/precision.WIRE_FORMATS: the precision of stage slices
    exits: bool | None = None             # pipeline / hybrid: early exits when every later block is dead
                                          # (None: when calibration images are at hand)
    exit_targets: str = "logits"          # what the exits are fitted to: the model's own logits (no labels), or
                                          # the labels of a --calib-data folder's class subfolders
