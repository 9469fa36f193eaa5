"""The Plan: for every partition unit, which output channels each board computes.

A channel may sit on several boards (replicas), never twice on one board. A channel is lost only when
every board holding it has failed. The Plan is a plain value: JSON round-trip, no torch.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PlanError

PLAN_SCHEMA = 1


@dataclass
class UnitPlacement:
    """Channels of one unit on each board; `groups[c]` is channel c's importance group (robust only).

    `parity` (coded distributed computing, the CDC baseline): that board holds no channel of its own but the
    sum of the other boards' weights (one more share), so it computes the sum of their pre-activations; with
    it alive, any one other dead board's channels are its sum minus the live boards' (exact), two or more
    dead boards' are lost."""

    channels: int
    board_channels: list[np.ndarray]     # [b]: the channels board b computes
    groups: np.ndarray | None = None
    parity: int | None = None

    def copies(self) -> np.ndarray:
        """How many boards hold each channel."""
        count = np.zeros(self.channels, dtype=np.int64)
        for held in self.board_channels:
            np.add.at(count, held, 1)
        return count

    def surviving(self, failed: Iterable[int]) -> np.ndarray:
        """Boolean mask of the channels still held by at least one live board."""
        failed = set(failed)
        if self.parity is not None and self.parity not in failed and len(failed) <= 1:
            return np.ones(self.channels, dtype=bool)          # the parity rebuilds the one dead board
        alive = np.zeros(self.channels, dtype=bool)
        for board, held in enumerate(self.board_channels):
            if board not in failed:
                alive[held] = True
        return alive

    def to_json(self) -> dict:
        out = {"channels": self.channels, "boards": [held.tolist() for held in self.board_channels]}
        if self.groups is not None:
            out["groups"] = self.groups.tolist()
        if self.parity is not None:
            out["parity"] = self.parity
        return out

    def share(self, board: int) -> float:
        """The fraction of the unit's channel parameters `board` holds (a parity board: the largest share)."""
        if board == self.parity:
            return max(len(h) for h in self.board_channels) / self.channels
        return len(self.board_channels[board]) / self.channels

    @classmethod
    def from_json(cls, data: dict) -> "UnitPlacement":
        groups = data.get("groups")
        return cls(channels=int(data["channels"]),
                   board_channels=[np.asarray(b, dtype=np.int64) for b in data["boards"]],
                   groups=None if groups is None else np.asarray(groups, dtype=np.int64),
                   parity=data.get("parity"))


MODES = ("horizontal", "pipeline", "hybrid")
SKIPS = ("failover", "always", "none")


@dataclass(frozen=True)
class Block:
    """Consecutive partition units run by one group of boards (pipeline: one board; hybrid: a group that
    splits each unit horizontally). `output` is the fx node of the one tensor it hands on (a legal cut,
    cuts.py); None for the last block, whose output is the model's."""

    units: tuple[str, ...]
    boards: tuple[int, ...]
    output: str | None

    def failed(self, failed: Iterable[int]) -> bool:
        """True when every board of the group has failed: nothing computes the block."""
        return set(self.boards) <= set(failed)

    def to_json(self) -> dict:
        return {"units": list(self.units), "boards": list(self.boards), "output": self.output}

    @classmethod
    def from_json(cls, data: dict) -> "Block":
        return cls(tuple(str(u) for u in data["units"]), tuple(int(b) for b in data["boards"]),
                   None if data.get("output") is None else str(data["output"]))


@dataclass
class Plan:
    n_boards: int
    units: dict[str, UnitPlacement]
    method: str
    options: dict = field(default_factory=dict)     # threshold(s), criteria, seed: how it was made
    model: dict = field(default_factory=dict)       # name, source hash, input spec
    fill: str = "zero"
    mode: str = "horizontal"                        # MODES
    blocks: list[Block] = field(default_factory=list)   # empty in horizontal mode (one block, every board)
    skip: str = "none"                              # SKIPS: a dead block's output is replaced by an adapter
                                                    # from the last tensor a live block computed
    exits: bool = False                             # early exits: a classifier at a cut when every later
                                                    # block is dead
    hyperconnections: dict = field(default_factory=dict)   # skip always: {"weights": routes.SKIP_WEIGHTS,
                                                    # "board_failure": p} (routes.blend_weights)

    def block_list(self) -> list[Block]:
        """The blocks; horizontal mode is the case of one block on every board."""
        return self.blocks or [Block(tuple(self.units), tuple(range(self.n_boards)), None)]

    # ---- queries -------------------------------------------------------------------------------
    def surviving(self, unit: str, failed: Iterable[int]) -> np.ndarray:
        return self.units[unit].surviving(failed)

    def lost_signature(self, failed: Iterable[int]) -> tuple:
        """Identifies which channels a failure set loses; equal signatures give equal outputs."""
        failed = tuple(failed)
        return tuple(tuple(np.flatnonzero(~p.surviving(failed)).tolist()) for p in self.units.values())

    def replication_factor(self) -> float:
        """Channel copies over channels, over all units."""
        copies = sum(int(p.copies().sum()) for p in self.units.values())
        return copies / sum(p.channels for p in self.units.values())

    # ---- checks --------------------------------------------------------------------------------
    def validate(self, unit_channels: dict[str, int] | None = None) -> None:
        """Every channel of every unit is on at least one board, indices are in range, and no board holds
        the same channel twice (so a replica never shares a board with its original)."""
        if self.n_boards < 1:
            raise PlanError(f"a plan needs at least one board, has {self.n_boards}")
        if unit_channels is not None:
            if set(unit_channels) != set(self.units):
                missing = sorted(set(unit_channels) - set(self.units))
                extra = sorted(set(self.units) - set(unit_channels))
                raise PlanError(f"plan does not match the model: units missing {missing[:5]}, "
                                f"unknown {extra[:5]}; compile the plan for this model")
        for name, p in self.units.items():
            if unit_channels is not None and unit_channels[name] != p.channels:
                raise PlanError(f"unit '{name}' has {unit_channels[name]} channels in the model, "
                                f"{p.channels} in the plan")
            if len(p.board_channels) != self.n_boards:
                raise PlanError(f"unit '{name}' is placed on {len(p.board_channels)} boards, plan has {self.n_boards}")
            for board, held in enumerate(p.board_channels):
                if held.size and (held.min() < 0 or held.max() >= p.channels):
                    raise PlanError(f"unit '{name}' board {board} holds a channel index outside "
                                    f"0..{p.channels - 1}")
                if np.unique(held).size != held.size:
                    raise PlanError(f"unit '{name}' board {board} holds a channel twice: a replica must go "
                                    f"to a board that does not already hold that channel")
            uncovered = np.flatnonzero(p.copies() == 0)
            if uncovered.size:
                raise PlanError(f"unit '{name}': channels {uncovered[:8].tolist()} are on no board")
        self._validate_blocks()

    def _validate_blocks(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.skip not in SKIPS:
            raise PlanError(f"unknown skip '{self.skip}'; choose one of {', '.join(SKIPS)}")
        if self.hyperconnections:
            from .routes import SKIP_WEIGHTS
            weights, p = self.hyperconnections.get("weights"), self.hyperconnections.get("board_failure")
            if self.skip != "always" or weights not in SKIP_WEIGHTS or not isinstance(p, (int, float)) \
                    or not 0 <= p < 1:
                raise PlanError(f"hyperconnection weights {self.hyperconnections} need skip 'always', weights one "
                                f"of {', '.join(SKIP_WEIGHTS)} and a board failure probability in [0, 1)")
        if not self.blocks:
            if self.mode != "horizontal" or self.skip != "none" or self.exits:
                raise PlanError(f"a {self.mode} plan with skip '{self.skip}' and exits={self.exits} needs blocks")
            return
        order = [u for b in self.blocks for u in b.units]
        if order != list(self.units):
            raise PlanError("the plan's blocks must hold every unit once, in the model's order")
        seen: set[int] = set()
        for k, block in enumerate(self.blocks):
            if not block.units or not block.boards:
                raise PlanError(f"block {k} has no units or no boards")
            if any(not 0 <= b < self.n_boards for b in block.boards) or seen & set(block.boards):
                raise PlanError(f"block {k}: boards {list(block.boards)} are out of range or shared with "
                                f"another block")
            seen |= set(block.boards)
            if (block.output is None) != (k == len(self.blocks) - 1):
                raise PlanError(f"block {k}: only the last block ends at the model output")
            for name in block.units:
                outside = [b for b, held in enumerate(self.units[name].board_channels)
                           if held.size and b not in block.boards]
                if outside:
                    raise PlanError(f"unit '{name}' of block {k} has channels on boards {outside}, outside the "
                                    f"block's group {list(block.boards)}")

    # ---- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = {"schema": PLAN_SCHEMA, "n_boards": self.n_boards, "method": self.method,
               "options": self.options, "model": self.model, "fill": self.fill,
               "units": {name: p.to_json() for name, p in self.units.items()}}
        if self.blocks:
            out.update(mode=self.mode, blocks=[b.to_json() for b in self.blocks], skip=self.skip,
                       exits=self.exits)
            if self.hyperconnections:
                out["hyperconnections"] = dict(self.hyperconnections)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("schema") != PLAN_SCHEMA:
            raise PlanError(f"plan schema {data.get('schema')!r} is not supported (expected {PLAN_SCHEMA}); "
                            f"recompile with this version of robustpart")
        try:
            plan = cls(n_boards=int(data["n_boards"]), method=str(data["method"]),
                       options=dict(data.get("options", {})), model=dict(data.get("model", {})),
                       fill=str(data.get("fill", "zero")),
                       units={k: UnitPlacement.from_json(v) for k, v in data["units"].items()},
                       mode=str(data.get("mode", "horizontal")),
                       blocks=[Block.from_json(b) for b in data.get("blocks", [])],
                       skip=str(data.get("skip", "none")), exits=bool(data.get("exits", False)),
                       hyperconnections=dict(data.get("hyperconnections", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan is malformed: {exc!r}") from exc
        plan.validate()
        return plan

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        return cls.from_json(data)
