"""The mesh on an emulated 1 Gbit/s LAN: each board in its own network namespace, joined to a bridge by a
veth pair whose two ends are shaped by a `tc` token bucket (tbf; `netem` is not available here), the client
on the bridge. Per bundle: p50 / p99 latency with 1 request in flight and images/s with 4, healthy and
after one board is killed (and taken over, unless the bundle has no backups), against

  wire bound:     the busiest link's bytes per image (the channels this protocol sends, each once, the
                  busier direction, with the input from the client) / the link rate;
  compute bound:  the busiest board's shard time per image (`robustpart profile`, idle, same run);
  machine bound:  all boards' shard time / the cores here (the boards share this machine's CPUs, which
                  real boards do not).

Needs root, `ip` and `tc`. The boards share one machine's cores, so the compute side is pessimistic.

    uv run robustpart compile fmnist_vgg16_bn --devices 4 --out /tmp/vgg4c
    uv run robustpart compile vgg16 --weights none --devices 4 --scores l1 --out /tmp/vgg16-224
    sudo uv run python benchmarks/bench_lan.py --bundle /tmp/vgg4c --bundle /tmp/vgg16-224
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))     # the network namespaces helper

from bench_mesh import windowed_throughput                                    # noqa: E402
from netns import Namespaces, netns_unavailable                               # noqa: E402
from robustpart.runtime import load_manifest                                  # noqa: E402
from robustpart.runtime.mesh import LocalCluster, MeshClient, MeshSettings     # noqa: E402
from robustpart.runtime.mesh.inputs import load_inputs                        # noqa: E402
from robustpart.runtime.mesh.peers import BoardAddress, Inventory             # noqa: E402
from robustpart.runtime.profile import profile_board                          # noqa: E402
from robustpart.traffic import traffic_per_image                              # noqa: E402

PORT = 5550


def shape(spaces: Namespaces, rate: str, burst: str) -> None:
    """A token bucket on both ends of every board's veth pair (each direction of its link)."""
    for ns, veth in zip(spaces.ns, spaces.veth):
        for prefix in ([], ["ip", "netns", "exec", ns]):
            dev = veth if not prefix else "eth0"
            subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                            "latency", "100ms"], check=True, capture_output=True, text=True)


def rate_bits_per_s(rate: str) -> float:
    """A tc rate such as "1gbit" or "100mbit" in bits per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next((u for u in units if rate.lower().endswith(u)), None)
    if unit is None:
        raise SystemExit(f"rate {rate!r}: give it as tc does, e.g. 1gbit, 100mbit or 500kbit")
    return float(rate.lower()[:-len(unit)]) * units[unit]


def link_bytes(manifest, live: list[int]) -> dict[int, int]:
    """Per live board, the bytes per image its link carries the busier way (payloads as this protocol sends
    them, robustpart.traffic; headers aside): max(sent, received), the input counted as received and the
    final slice as sent."""
    rows = traffic_per_image(manifest, live)
    last, value = manifest.stages[-1], 2 if manifest.wire == "fp16" else 4
    out = {}
    for b in live:
        received = rows[b]["received"] + int(np.prod(manifest.input.shape)) * 4
        final = int(np.prod(manifest.output.shape)) * 4 if manifest.head else \
            len(last.shards[b].channels) * int(np.prod(last.shape)) // last.channels * value
        out[b] = max(rows[b]["sent"] + final, received)
    return out


def latency(client: MeshClient, images: np.ndarray, count: int) -> dict:
    answers = [client.infer(images[i % len(images)][None]) for i in range(count)]
    ms = np.array([a.latency for a in answers]) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "consistent": sum(a.consistent for a in answers), "images": count,
            "failure_sets": sorted({str(a.failed) for a in answers}),
            "techniques": sorted({a.technique for a in answers if a.technique}),
            "board_to_board_bytes": round(statistics.mean(a.mesh_bytes for a in answers))}


def run_bundle(bundle: Path, rate_bps: float, rate: str, burst: str, count: int, victim: int,
               settings: MeshSettings, workdir: Path) -> dict:
    manifest = load_manifest(bundle)
    n = manifest.boards
    profiles = {b: profile_board(bundle, b, repeats=10) for b in range(n)}      # idle: before the mesh starts
    shard_ms = {b: profiles[b]["total_ms_p50"] for b in range(n)}
    if manifest.input.shape == (1, 28, 28):
        images, _ = load_inputs("bundled", manifest, 64)
    else:
        images = np.random.default_rng(0).standard_normal((8, *manifest.input.shape)).astype(np.float32)
    spaces = Namespaces(n, "10.231.79")
    result = {"bundle": str(bundle), "boards": n, "rate": rate, "shard_ms_p50": shard_ms}
    try:
        spaces.up()
        shape(spaces, rate, burst)
        inventory = Inventory([BoardAddress(k, spaces.address(k), PORT) for k in range(n)], source="netns")
        with LocalCluster(bundle, settings, inventory, workdir, verbose=False,
                          wrap=lambda k: ["ip", "netns", "exec", spaces.ns[k]]) as cluster:
            cluster.start().wait_started(timeout=120)
            with MeshClient(bundle, inventory=inventory, settings=settings, deadline=30.0) as client:
                client.wait_ready(30)
                latency(client, images, 5)                                      # warm-up
                for name, live in (("healthy", list(range(n))), ("one_killed", [b for b in range(n) if b != victim])):
                    if name == "one_killed":
                        cluster.kill(victim)
                        time.sleep(settings.timeout + 0.5)
                        end = time.time() + 30                                   # until taken over, if it will be
                        while manifest.backups and time.time() < end and not any(
                                e["event"] == "takeover" for b in live for e in cluster.events(b)):
                            time.sleep(0.1)
                        latency(client, images, 3)
                    links = link_bytes(manifest, live)
                    taken = {e["board"]: e["peer"] for b in live for e in cluster.events(b) if e["event"] == "takeover"}
                    work = {b: shard_ms[b] + sum(shard_ms[d] for t, d in taken.items() if t == b) for b in live}
                    wire_ms = max(links.values()) * 8 / rate_bps * 1e3
                    compute_ms = max(work.values())
                    machine_ms = sum(work.values()) / os.cpu_count()
                    one = latency(client, images, count)
                    four = windowed_throughput(client, images, 2 * count, 4)
                    bound = max(wire_ms, compute_ms)
                    result[name] = {
                        "one_in_flight": one, "four_in_flight": {"images_per_s": four["images_per_s"],
                                                                 "consistent": four["consistent"]},
                        "wire_bound_ms": round(wire_ms, 2), "compute_bound_ms": round(compute_ms, 2),
                        "machine_cpu_bound_ms": round(machine_ms, 2), "busiest_link_bytes": max(links.values()),
                        "p50_over_bound": round(one["p50_ms"] / bound, 2),
                        "target_p50_ms": round(1.3 * bound + 2, 2),
                        "rate_over_bound_rate": round(four["images_per_s"] * bound / 1e3, 2),
                        "taken_over": taken}
                    print(json.dumps({name: result[name]}), flush=True)
    finally:
        spaces.down()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="repeatable")
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate per link direction (default 1gbit)")
    parser.add_argument("--burst", default="256kb", help="tc tbf bucket size (default 256kb)")
    parser.add_argument("--images", type=int, default=30, help="images per measurement (default 30)")
    parser.add_argument("--victim", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"bench_lan needs network namespaces: {reason}")
    rate_bps = rate_bits_per_s(args.rate)
    settings = MeshSettings(heartbeat=0.1, timeout=1.0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-lan-") as tmp:
        for i, bundle in enumerate(args.bundle):
            results.append(run_bundle(bundle, rate_bps, args.rate, args.burst, args.images, args.victim, settings,
                                      Path(tmp) / f"b{i}"))
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
