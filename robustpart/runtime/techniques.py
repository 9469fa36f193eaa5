"""Which technique answers for each failure set, chosen against the user's objectives (CONTINUER, paper 004).

For a failure set F the candidates are
  compensate  (horizontal bundles) the survivors answer at once with the lost channels rebuilt (or filled,
              without compensation data): the accuracy the simulator measured for F, no downtime;
  bypass      (pipeline / hybrid bundles) the dead blocks are bypassed by the skips and exits of
              routes.route, the lost channels of a group compensated: the simulator's accuracy for F;
  takeover    the dead boards' backups load their shards from disk and compute their channels (or, in a
              pipeline, their blocks) too (runtime/takeover.py): the no-failure accuracy, after a downtime
              of the load time, with more work (latency) and memory on the boards that take over.
Latency per candidate is the sum over stages of the slowest live board's shard time (its own, plus those
it takes over), from the boards' profiles (`robustpart profile BUNDLE --device K` writes profile_K.json);
downtime the load times the profiles measured. A policy file says what the user wants:

    {"min_accuracy": 0.85, "max_latency_ms": 40, "max_downtime_ms": 500,
     "weights": {"accuracy": 0.6, "latency": 0.2, "downtime": 0.2, "memory": 0}}

Candidates outside a limit are dropped; among the rest, CONTINUER's normalised weighted sum picks one
(each metric scaled to [0, 1] over the remaining candidates, 1 the best; a metric equal for all counts
fully for all; the dropped ones score 0). When none meets the limits, the most accurate is chosen and the choice says so. The choices go to
`techniques.json` in the bundle; a board reads it and does not take over where it says otherwise.
`technique_in_use` says which technique the mesh answers with now (`robustpart status`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..routes import answered_by, describe
from .files import write_file_atomically
from .mesh.protocol import boards_of
from .takeover import assign_takeovers, eligible_backups

TECHNIQUES_FILE = "techniques.json"
COMPENSATE, BYPASS, TAKEOVER = "compensate", "bypass", "takeover"
METRICS = ("accuracy", "latency", "downtime", "memory")       # accuracy: higher is better; others lower
DEFAULT_WEIGHTS = {"accuracy": 0.6, "latency": 0.2, "downtime": 0.2, "memory": 0.0}
LIMITS = {"min_accuracy": "accuracy", "max_latency_ms": "latency", "max_downtime_ms": "downtime",
          "max_memory_bytes": "memory"}


@dataclass(frozen=True)
class Policy:
    limits: dict = field(default_factory=dict)          # LIMITS key -> value
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    @classmethod
    def load(cls, path: Path | str) -> "Policy":
        where = f"policy file {path}"
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {where}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object like {{\"min_accuracy\": 0.85, \"weights\": {{...}}}}")
        unknown = sorted(set(data) - set(LIMITS) - {"weights"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join([*LIMITS, 'weights'])}")
        limits = {}
        for key in LIMITS:
            if key in data:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                        (key == "min_accuracy" and value > 1):
                    bound = " and <= 1 (a fraction)" if key == "min_accuracy" else ""
                    raise ConfigError(f"{where}: {key} must be a number >= 0{bound}, got {value!r}")
                limits[key] = float(value)
        weights = dict(DEFAULT_WEIGHTS)
        given = data.get("weights", {})
        if not isinstance(given, dict) or set(given) - set(METRICS):
            raise ConfigError(f"{where}: weights must be an object with keys among {', '.join(METRICS)}")
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where}: weight {key} must be a number >= 0, got {value!r}")
            weights[key] = float(value)
        if not any(weights.values()):
            raise ConfigError(f"{where}: every weight is 0; give at least one a positive weight")
        return cls(limits, weights)

    def to_json(self) -> dict:
        return {**self.limits, "weights": self.weights}


@dataclass
class Candidate:
    technique: str
    accuracy: float
    latency_ms: float | None          # None: a board's profile is missing
    downtime_ms: float | None
    memory_bytes: int                 # the most any live board holds
    score: float = 0.0
    meets: bool = True
    why: str = ""                     # the limit it breaks

    def metric(self, name: str):
        return {"accuracy": self.accuracy, "latency": self.latency_ms, "downtime": self.downtime_ms,
                "memory": self.memory_bytes}[name]


def load_profiles(root: Path | str, boards: int) -> dict[int, dict]:
    """The profile_K.json files next to the manifest (those that exist)."""
    out = {}
    for b in range(boards):
        path = Path(root) / f"profile_{b}.json"
        if path.is_file():
            out[b] = json.loads(path.read_text())
    return out


def _stage_times(profiles: dict[int, dict], boards: int) -> dict[int, dict[int, float]] | None:
    """board -> {stage: ms p50}; None unless every board has a profile."""
    if any(b not in profiles for b in range(boards)):
        return None
    return {b: {s["stage"]: s["ms_p50"] for s in profiles[b]["stages"]} for b in range(boards)}


def candidates(manifest, failed, compensated_accuracy: float, healthy_accuracy: float,
               profiles: dict[int, dict]) -> list[Candidate]:
    """The techniques that can answer for failure set `failed`, with their metrics."""
    n, failed = manifest.boards, tuple(sorted(failed))
    live = [b for b in range(n) if b not in failed]
    params = [manifest.param_bytes(b) for b in range(n)]
    comp = manifest.compensation
    times = _stage_times(profiles, n)
    stages = [s.index for s in manifest.stages]

    def latency(work: dict[int, list[int]]) -> float | None:
        if times is None:
            return None
        return round(sum(max(sum(times[d].get(s, 0.0) for d in work[b]) for b in live) for s in stages), 3)

    held = max(params[b] + (comp.held_bytes(b) if comp else 0) for b in live)
    pipeline = manifest.pipeline
    out = [Candidate(COMPENSATE if pipeline is None else BYPASS, compensated_accuracy,
                     latency({b: [b] for b in live}), 0.0, held)]
    groups = None if pipeline is None else [block.boards for block in pipeline.blocks]
    backups = eligible_backups(manifest.backup_lists(), groups) if manifest.backup_lists() else ()
    assigned = assign_takeovers(backups, failed, params, manifest.memory_budget) if any(backups) else {}
    if assigned and len(assigned) == len(failed):          # every dead board taken over: the exact answer
        work = {b: [b] + [d for d, t in assigned.items() if t == b] for b in live}
        loads = [profiles.get(t, {}).get("takeover_load_ms", {}).get(str(d)) for d, t in assigned.items()]
        downtime = None if None in loads else round(max(loads), 2)
        memory = max(sum(params[d] for d in work[b]) for b in live)
        out.append(Candidate(TAKEOVER, healthy_accuracy, latency(work), downtime, memory))
    return out


def choose(options: list[Candidate], policy: Policy) -> Candidate:
    """Drop what breaks a limit; CONTINUER's normalised weighted sum over the rest (the most accurate when
    nothing meets the limits: then every candidate is scored). Scores are set on every candidate."""
    for c in options:
        for key, metric in LIMITS.items():
            value, limit = c.metric(metric), policy.limits.get(key)
            if limit is None:
                continue
            if value is None:
                raise ConfigError(f"the policy sets {key} but a board's profile is missing: run `robustpart "
                                  f"profile BUNDLE --device K` for every board K (it writes profile_K.json)")
            if (value < limit) if metric == "accuracy" else (value > limit):
                c.meets, c.why = False, f"{metric} {value:g} vs {key} {limit:g}"
                break
    meeting = [c for c in options if c.meets]
    scored = meeting or options               # normalised over the candidates in the running
    for c in options:
        c.score = 0.0
    for c in scored:
        for metric in METRICS:
            weight = policy.weights.get(metric, 0.0)
            values = [o.metric(metric) for o in scored]
            if not weight or None in values:
                continue
            lo, hi = min(values), max(values)
            if hi == lo:
                good = 1.0
            else:
                frac = (c.metric(metric) - lo) / (hi - lo)
                good = frac if metric == "accuracy" else 1.0 - frac
            c.score += weight * good
        c.score = round(c.score, 4)
    if meeting:
        return max(meeting, key=lambda c: (c.score, c.accuracy))
    return max(options, key=lambda c: (c.accuracy, c.score))


def set_key(failed) -> str:
    return ",".join(map(str, sorted(failed)))


def write_techniques(root: Path | str, policy: Policy, chosen: dict[tuple, str]) -> Path:
    data = {"policy": policy.to_json(), "sets": {set_key(f): t for f, t in sorted(chosen.items())}}
    return write_file_atomically(Path(root) / TECHNIQUES_FILE, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def load_techniques(root: Path | str) -> dict[frozenset, str]:
    """failure set -> technique from the bundle's techniques.json ({} without one: takeover where it can)."""
    path = Path(root) / TECHNIQUES_FILE
    if not path.is_file():
        return {}
    try:
        sets = json.loads(path.read_text())["sets"]
        return {frozenset(int(b) for b in key.split(",") if b != ""): str(t) for key, t in sets.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a techniques file ({exc}); run `robustpart evaluate BUNDLE --policy "
                          f"FILE` again, or delete it") from exc


def select(manifest, per_set: dict, ks, policy: Policy, profiles: dict[int, dict]) -> list[tuple]:
    """For every failure set of the sizes `ks`: (failed, candidates, chosen), from the accuracies the
    evaluation measured for the bundle's plan (`per_set`: failure set -> accuracy, () the healthy one)."""
    from itertools import combinations
    rows = []
    for k in ks:
        for failed in combinations(range(manifest.boards), k):
            options = candidates(manifest, failed, per_set[failed], per_set[()], profiles)
            rows.append((failed, options, choose(options, policy)))
    return rows


def technique_in_use(manifest, answering, covers: dict[int, int]) -> str:
    """What the answers use for the boards that answer now: the full model, a takeover (a backup computes a
    dead board's channels), compensation for the failure set, a fill (no compensation data for it) or, for
    a pipeline / hybrid bundle, the skips and exits of routes.describe. `answering`: the boards requests go
    to; `covers`: board -> the boards it says it has taken over (mask)."""
    answering = set(answering)
    dead = sorted(set(range(manifest.boards)) - answering)
    if not answering:
        return "none: no board answers"
    if not dead:
        return "full model"
    taken = {d: t for t in sorted(answering) for d in boards_of(covers.get(t, 0)) if d in dead}
    parts = [f"board {d} taken over by {t}" for d, t in sorted(taken.items())]
    lost = tuple(d for d in dead if d not in taken)
    if manifest.pipeline is not None:
        adapters = manifest.load_adapters()
        exit_for = adapters.exit_for if adapters is not None else None
        if lost or not parts:
            parts.append(describe(manifest.pipeline, lost, answered_by(manifest.pipeline, lost, exit_for)))
        return "; ".join(parts)
    if lost:
        names = ",".join(map(str, lost))
        comp = manifest.compensation
        if comp is not None and lost in {tuple(s) for s in comp.sets}:
            parts.append(f"compensated for boards {names}")
        else:
            parts.append(f"channels of boards {names} filled (no compensation for this failure set)")
    return "; ".join(parts)
