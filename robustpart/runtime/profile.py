"""`robustpart profile BUNDLE --device K`: what board K's shards cost on the machine it runs on.

Per stage, the median and 90th-percentile time of one batch through the board's shard (random inputs of
the shard's own shapes, after warm-up runs); the time to open its sessions; and for every board it backs up
(runtime/takeover.py) the time a takeover takes to check that board's files and open them. Written to
`profile_K.json` next to the manifest (atomically), for the technique choice to read: latency per
failure set comes from it, downtime from the load times.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .executor import open_session, resolve_providers, session_options
from .files import write_file_atomically
from .manifest import check_files, load_manifest
from .providers import input_feeds


def _open_all(manifest, board: int, providers, options) -> list:
    return [open_session(manifest.shard_path(s, board), providers, options)
            for s in manifest.stages if s.shards[board].has_work]


def profile_board(bundle: Path | str, device: int, provider: str = "cpu", threads: int = 1, repeats: int = 20,
                  batch: int = 1, warmup: int = 3) -> dict:
    manifest = load_manifest(bundle, boards=[device])
    providers, options = resolve_providers(provider), session_options(threads)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    sessions = {s.index: open_session(manifest.shard_path(s, device), providers, options)
                for s in manifest.stages if s.shards[device].has_work}
    load_ms = (time.perf_counter() - start) * 1e3
    stages = []
    for index, session in sessions.items():
        feeds = input_feeds(session, batch, rng)
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        stage = manifest.stages[index]
        stages.append({"stage": index, "unit": stage.unit, "ms_p50": round(statistics.median(times), 4),
                       "ms_p90": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4)})
    takeovers = {}
    for dead, holders in enumerate(manifest.backup_lists()):
        if device in holders:
            t = time.perf_counter()
            check_files(manifest, [dead])
            _open_all(manifest, dead, providers, options)
            takeovers[str(dead)] = round((time.perf_counter() - t) * 1e3, 2)
    return {"board": device, "provider": provider, "threads": threads, "batch": batch, "repeats": repeats,
            "stages": stages, "total_ms_p50": round(sum(s["ms_p50"] for s in stages), 4),
            "load_ms": round(load_ms, 2), "takeover_load_ms": takeovers}


def write_profile(bundle: Path | str, profile: dict) -> Path:
    """`profile_K.json` next to the manifest, written to a temporary file first and renamed into place."""
    path = Path(bundle) / f"profile_{profile['board']}.json"
    return write_file_atomically(path, lambda tmp: tmp.write_text(json.dumps(profile, indent=1)))
