"""Which technique answers for a dead block of a pipeline / hybrid plan (plain logic on its blocks: the
simulator reads them from the Plan, the executor and the boards from the manifest).

Block k reads cut tensor T_k (T_0: the model input) and hands on T_{k+1} (T_B, B blocks: the model
output). When every board of block k's group has failed, T_{k+1} is rebuilt from T_j, the last cut tensor
a live block computed (j <= k; the input always counts), by the adapter A_{j->k+1} (skips.py): a skip
hyperconnection for an inner cut, an early exit for the output. Without that technique it reads as zeros
(deepFogGuard's null vector).

Who holds an adapter: a skip A_{j->t} (t < B) sits with block t's group, which applies it to the T_j it
receives when its predecessor is dead; an exit A_{j->B} sits with block j-1's group, which produced T_j
and answers with the exit when every later block is dead (the exit from the input, on every board after
the first block). For some failure sets an exit answers even though later blocks live, because it agreed
better with the model on held-out calibration images (`exit_for`, skips.choose_exits).

`--skip always` (ResiliNet+ / deepFogGuard): besides rebuilding a dead block's output as failover does,
every inner cut t whose producing block lives is the weighted sum of the live connections into it: block
t-1's own output and the skip hyperconnection A_{t-1->t}(T_{t-1}) from block t-2 (the input for t = 1),
with ResiliNet's weights (`blend_weights`). The producer computes the sum (it holds T_{t-1}, its own input,
and the adapter too), so what crosses the wire is one tensor per cut, as in failover; the consumer holds the
adapter for when the producer is dead. The no-failure output is then not the original model's: failout
fine-tuning (finetune.py) trains the network and the adapters with the hyperconnections in place.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # or a runtime.manifest.PipelineEntry: anything with block_list(), skip and exits
    from .plan import Plan


SKIP_WEIGHTS = ("relative", "reliability", "one")   # ResiliNet's hyperconnection weights (--skip-weights)
DEFAULT_SKIP_WEIGHTS = "relative"
DEFAULT_BOARD_FAILURE = 0.04      # a board's failure probability for the weights: ResiliNet's "normal" setting


def live_source(plan: Plan, t: int, failed: Iterable[int]) -> int:
    """For cut t whose producing block t-1 is dead: the last cut j < t a live block computed (0: input)."""
    blocks, failed = plan.block_list(), set(failed)
    j = t - 1
    while j > 0 and blocks[j - 1].failed(failed):
        j -= 1
    return j


def needed_pairs(plan: Plan) -> list[tuple[int, int]]:
    """The (source cut, target cut) pairs a plan's techniques may use: skips into every inner cut, and exits
    from the input and every inner cut (the input's answers when the first block is dead and an exit from
    the pixels agrees better with the model than the route through the live blocks: choose_exits)."""
    n = len(plan.block_list())
    pairs = []
    for t in range(1, n + 1):
        wanted = plan.exits if t == n else plan.skip in ("failover", "always")
        pairs += [(j, t) for j in range(0, t)] if wanted else []
    return pairs


def route(plan: Plan, failed: Iterable[int], exit_for: dict | None = None) -> dict[int, tuple[str, int | None]]:
    """For every cut t whose producing block is dead: ("skip" | "exit", source j) when the plan has that
    technique, else ("fill", None): the tensor reads as zeros (deepFogGuard's null vector). `exit_for` (an
    AdapterSet's): failure sets answered by the early exit from a given cut, live blocks or not."""
    blocks, failed = plan.block_list(), set(failed)
    n, out = len(blocks), {}
    for t in range(1, n + 1):
        if not blocks[t - 1].failed(failed):
            continue
        j = live_source(plan, t, failed)
        if t == n:
            out[t] = ("exit", j) if plan.exits and j > 0 else ("fill", None)
        else:
            out[t] = ("skip", j) if plan.skip in ("failover", "always") else ("fill", None)
    chosen = (exit_for or {}).get(frozenset(failed))
    if chosen is not None:
        out[n] = ("exit", chosen)
    return out


def _reliability(plan: Plan, k: int) -> float:
    """The probability that block k lives (some board of its group does); k = -1: the input, always there."""
    if k < 0:
        return 1.0
    p = float(plan.hyperconnections.get("board_failure", DEFAULT_BOARD_FAILURE))
    return 1.0 - p ** len(plan.block_list()[k].boards)


def _weighted(plan: Plan, sources: list[int]) -> list[float]:
    """ResiliNet's weights of the live connections from blocks `sources` into one cut: 1 each ("one"), the
    source's reliability ("reliability"), or the reliability relative to the live connections' sum
    ("relative", so that a lone connection counts fully)."""
    scheme = plan.hyperconnections.get("weights", DEFAULT_SKIP_WEIGHTS)
    if scheme == "one":
        return [1.0] * len(sources)
    r = [_reliability(plan, k) for k in sources]
    return r if scheme == "reliability" else [v / sum(r) for v in r]


def blend_weights(plan: Plan, failed: Iterable[int]) -> dict[int, tuple[float, float]]:
    """--skip always: per inner cut t whose producing block t-1 lives, (w_own, w_skip): the cut is w_own x
    block t-1's output + w_skip x A_{t-1->t}(T_{t-1}). The skip is live while its source is (block t-2, or the
    input for t = 1); cuts where the sum is the block's output alone (w_own 1, w_skip 0) are left out."""
    if plan.skip != "always":
        return {}
    blocks, failed = plan.block_list(), set(failed)
    out = {}
    for t in range(1, len(blocks)):
        if blocks[t - 1].failed(failed):
            continue                                 # rebuilt as in failover (route), scaled by skip_scale
        skip_live = t == 1 or not blocks[t - 2].failed(failed)
        weights = _weighted(plan, [t - 1, t - 2] if skip_live else [t - 1])
        pair = (weights[0], weights[1] if skip_live else 0.0)
        if pair != (1.0, 0.0):
            out[t] = pair
    return out


def skip_scale(plan: Plan, j: int) -> float:
    """--skip always: the weight of a dead block's output rebuilt from cut j (the one live connection into
    it, from block j-1 or the input); 1 for failover, which replaces the output instead of weighing it."""
    if plan.skip != "always":
        return 1.0
    return _weighted(plan, [j - 1])[0]


def blend(own, weights: tuple[float, float], skip):
    """--skip always: a cut as w_own x the block's output `own` + w_skip x `skip()`, the skip adapter applied to
    the cut before it (blend_weights). numpy arrays or torch tensors in (the LocalExecutor and the boards, the
    simulator), the same dtype out: float weights do not widen float32."""
    w_own, w_skip = weights
    out = own * w_own
    return out + w_skip * skip() if w_skip else out


def holder(plan: Plan, pair: tuple[int, int]) -> tuple[int, ...]:
    """The boards that hold adapter `pair`: the consumer's group for a skip, the producer's for an exit;
    the exit from the input (every board has the input) sits on every board outside the first block, so
    that any of them can answer while the first block is dead. With --skip always the one-block skip
    A_{t-1->t} sits with the producer's group too, which adds it to its output."""
    blocks = plan.block_list()
    j, t = pair
    if t < len(blocks):
        if plan.skip == "always" and j == t - 1:
            return tuple(sorted({*blocks[t - 1].boards, *blocks[t].boards}))
        return blocks[t].boards
    if j > 0:
        return blocks[j - 1].boards
    return tuple(b for block in blocks[1:] for b in block.boards)


def held_adapter_bytes(plan: Plan, pair_bytes: dict[tuple[int, int], int]) -> list[int]:
    """Per board, the bytes of the adapters it holds."""
    held = [0] * plan.n_boards
    for pair, n in pair_bytes.items():
        for board in holder(plan, pair):
            held[board] += n
    return held


def describe(plan: Plan, failed: Iterable[int], answered_by: int) -> str:
    """The techniques an answer for failure set `failed` used, in words: the skips (or zeros) that rebuilt
    dead blocks' outputs, then what gave the output: `answered_by` is the cut whose early exit answered,
    the number of blocks when the last block computed it, or -1 for zeros (no exit in the bundle)."""
    blocks, failed = plan.block_list(), set(failed)
    n = len(blocks)
    end = n if answered_by in (n, -1) else answered_by
    # only the cuts a live block read (or an exit answered from) were rebuilt; those inside a run of dead
    # blocks were skipped over
    used = [t for t in range(1, end + 1) if t < n and (t == end or not blocks[t].failed(failed))]
    actions = route(plan, failed)
    parts = [f"skip {actions[t][1]}->{t}" if actions[t][0] == "skip" else f"zeros for cut {t}"
             for t in used if t in actions]
    parts.append("blocks" if answered_by == n else "zeros" if answered_by == -1 else f"exit from cut {answered_by}")
    return ", ".join(parts)


def answered_by(plan: Plan, failed: Iterable[int], exit_for: dict | None = None) -> int:
    """What gives the output for failure set `failed` (describe's `answered_by`): the cut whose early exit
    answers, the number of blocks when the last block computes it, or -1 for zeros."""
    n = len(plan.block_list())
    final = route(plan, failed, exit_for).get(n)
    return n if final is None else final[1] if final[0] == "exit" else -1
