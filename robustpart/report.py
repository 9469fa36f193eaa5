"""Plain-text tables for people: a plan's cost and an evaluation's accuracy under failures."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cost import PlanCost
from .plan import Plan

if TYPE_CHECKING:
    from .graph import ModelGraph


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plan_report_text(graph: ModelGraph, plan: Plan, cost: PlanCost) -> str:
    lines = [f"model {graph.name}  ({_mb(graph.total_param_bytes)}, {graph.total_macs / 1e6:.1f} M MACs/image)",
             f"plan  {_plan_line(plan)}",
             f"replication factor {plan.replication_factor():.3f}; max board memory {_mb(cost.max_memory_bytes)} = "
             f"{cost.memory_ratio_full:.3f} x full model, {cost.memory_ratio_even:.3f} x even split "
             f"(parameters and the largest compensation set a board holds)", ""]
    lines.append(table(["board", "param bytes", "compensation", "memory", "MACs/image"],
                       [[str(b.board), _mb(b.param_bytes), _mb(b.compensation_bytes), _mb(b.memory_bytes),
                         f"{b.macs / 1e6:.1f} M"] for b in cost.boards]))
    lines.append("")
    rows = []
    for unit in graph.units:
        p = plan.units[unit.name]
        groups = "-" if p.groups is None else str(int(p.groups.max()) + 1)
        rows.append([unit.name, unit.kind, str(unit.channels), str(int(p.copies().sum()) - unit.channels), groups,
                     " ".join(str(b.size) for b in p.board_channels)])
    lines.append(table(["unit", "kind", "channels", "replicas", "groups", "channels per board"], rows))
    return "\n".join(lines) + "\n"


def _plan_line(plan: Plan) -> str:
    if not plan.blocks:
        return f"{plan.method} on {plan.n_boards} boards  {_options(plan)}"
    blocks = "; ".join(f"{b.units[0]}..{b.units[-1]} on board{'s' * (len(b.boards) > 1)} "
                       f"{','.join(map(str, b.boards))}" for b in plan.blocks)
    split = f", split by {plan.method} {_options(plan)}" if len(plan.blocks[0].boards) > 1 else ""
    return (f"{plan.mode} on {plan.n_boards} boards, {len(plan.blocks)} blocks{split}: {blocks}\n"
            f"      skip {plan.skip}{_hyperconnections(plan)}, early exits {'on' if plan.exits else 'off'}; board "
            f"memory counts the adapters")


def _hyperconnections(plan: Plan) -> str:
    h = plan.hyperconnections
    return f" ({h['weights']} weights, board failure {h['board_failure']:g})" if h else ""


def _options(plan: Plan) -> str:
    o = plan.options
    if plan.method == "robust":
        extra = f" (+{len(o['per_unit_thresholds'])} per-unit)" if o.get("per_unit_thresholds") else ""
        return f"threshold {o.get('threshold')}{extra}, scores {','.join(o.get('criteria', []))}"
    if plan.method == "random":
        return f"seed {o.get('seed')}"
    return ""


def evaluation_text(reports: list, ks: list[int], data_source: str) -> str:
    """One row per method: memory, accuracy with no failure, mean/min/max for each k, expected accuracy."""
    settings = list(reports[0].expected) if reports and reports[0].expected else []
    header = ["method", "repl", "mem/full", "mem/even", "no fail"]
    header += [f"{k} fail mean/min/max" for k in ks] + [f"E[{s}]" for s in settings]
    rows = []
    for r in reports:
        row = [r.label, f"{r.replication:.2f}", f"{r.cost['memory_ratio_full']:.3f}",
               f"{r.cost['memory_ratio_even']:.3f}", f"{100 * r.accuracy:.2f}"]
        row += [f"{100 * r.by_k[k].mean:.2f}/{100 * r.by_k[k].min:.2f}/{100 * r.by_k[k].max:.2f}" for k in ks]
        row += [f"{100 * r.expected[s]:.2f}" for s in settings]
        rows.append(row)
    return f"accuracy (%) on {data_source}\n" + table(header, rows) + "\n"


def shards_text(manifest) -> str:
    """Per board: bytes of its ONNX shards' parameters, the largest compensation set it holds, their sum (its
    memory while it answers under a failure), the most a takeover can add to it, bytes sent / received per
    image, stages; the boards that keep a copy of its shards (for a takeover) and what it stores on disk."""
    from .runtime.takeover import most_taken_over
    from .traffic import traffic_per_image
    backups = manifest.backup_lists()
    stored = storage_bytes(manifest)
    params = [manifest.param_bytes(b) for b in range(manifest.boards)]
    taken = most_taken_over(backups, params, manifest.memory_budget)
    comp = manifest.compensation
    rows = []
    for t in traffic_per_image(manifest):
        b = t["board"]
        held = comp.held_bytes(b) if comp else 0
        rows.append([str(b), _mb(params[b]), _mb(held), _mb(params[b] + held), _mb(taken[b]),
                     _kb(t["sent"]), _kb(t["received"]), _kb(t["min_received"]), str(t["stages"]),
                     ",".join(map(str, backups[b])) or "-", _mb(stored[b])])
    head = "" if manifest.head is None else f"; head shard {_mb(manifest.head.param_bytes)} on every board"
    if manifest.memory_budget is not None:
        head += f"; a takeover may bring a board to {_mb(manifest.memory_budget)} of parameters at most"
    return (f"ONNX shards: {len(manifest.stages)} stages x {manifest.boards} boards{head}\n" +
            table(["board", "shard params", "compensation", "memory", "+takeover", "sent/image", "received/image",
                   "min received", "stages", "backups", "stores"], rows) + "\n" +
            "memory = shard params + the largest compensation set the board holds at once; +takeover: the most "
            "parameters a takeover adds to it\n")


def storage_bytes(manifest) -> list[int]:
    """Per board, the bytes of the bundle files it keeps on disk: its shards, those of every board it backs
    up (a file two of them share, such as a cut stage's, once), the head, the adapters and compensation."""
    files = [{s.shards[b].file for s in manifest.stages if s.shards[b].has_work} for b in range(manifest.boards)]
    shared = [manifest.head.file if manifest.head else None, manifest.compensation.file if manifest.compensation
              else None, manifest.pipeline.adapters.file if manifest.pipeline and manifest.pipeline.adapters else None]
    size = lambda name: (manifest.root / name).stat().st_size if (manifest.root / name).is_file() else 0   # noqa: E731
    held = [set(own) for own in files]
    for board, holders in enumerate(manifest.backup_lists()):
        for holder in holders:
            held[holder] |= files[board]
    return [sum(size(f) for f in names | {f for f in shared if f}) for names in held]


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f} kB"
