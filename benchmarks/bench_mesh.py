"""The board mesh on this machine: throughput, latency and bytes per image, with and without a failure.

Runs the bundle's N boards as local `robustpart serve` processes (loopback TCP) and streams images to them:

  1. no failure: latency p50 / p95 / max and images/s, one image in flight, then `--window` in flight;
  2. across a kill -9 of one board: detection time per surviving board, and the requests in flight during
     the detection window (how long they took, whether their answers were consistent);
  3. with that board dead (after detection, and after a survivor has taken its shards over unless
     `--no-takeover`): latency and images/s again; the timeline around the kill (each request's latency
     and what answered) and the takeover's load time;
  4. bytes per image on the wire (client and board-to-board, headers included) against the analytic
     figures: what the protocol sends by design and the minimum (each board receives every channel it does
     not compute, once: the two are equal), and what sending whole slices would send;
  5. `--sweep`: paper 003 Fig. 3, latency per image against the liveness timeout, one board killed early
     in each stream, plus spurious detections in a failure-free stream of the same length.

Every mesh latency is paired with a LocalExecutor run of the same image right after it (same process as
the client, all boards' shards in one process, one thread) and, in the kill run, with a second, healthy
mesh of the same bundle: the ratios compare them under the same momentary load, which matters on a shared
machine. The LocalExecutor is the no-network lower bound; the healthy mesh is the no-failure latency.

    uv run robustpart compile fmnist_vgg16_bn --devices 4 --scores l1 --out /tmp/vgg4
    uv run python benchmarks/bench_mesh.py --bundle /tmp/vgg4
    uv run python benchmarks/bench_mesh.py --bundle /tmp/vgg4 --sweep 50,100,200,400,800
    uv run robustpart compile fmnist_resnet18 --devices 4 --mode pipeline --out /tmp/r18p
    uv run python benchmarks/bench_mesh.py --bundle /tmp/r18p --victim 1       # the middle of the chain
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from robustpart.runtime import LocalExecutor
from robustpart.traffic import traffic_per_image
from robustpart.runtime.mesh import LocalCluster, MeshClient, MeshSettings
from robustpart.runtime.mesh.inputs import load_inputs


def percentiles(values_s: list[float]) -> dict:
    ms = np.asarray(values_s) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
            "max": round(float(ms.max()), 2), "n": len(ms)}


def paired_stream(client: MeshClient, local: LocalExecutor, images: np.ndarray, count: int | None = None,
                  seconds: float | None = None, on_index=None, healthy: MeshClient | None = None):
    """One image at a time to the mesh, each followed by the LocalExecutor on the same image (and by the
    healthy reference mesh, if given). Returns answers, local seconds, healthy-mesh seconds."""
    answers, local_s, healthy_s, start = [], [], [], time.monotonic()
    while (count is None or len(answers) < count) and (seconds is None or time.monotonic() - start < seconds):
        x = images[len(answers) % len(images)][None]
        if on_index:
            on_index(len(answers))
        answers.append(client.infer(x))
        t = time.perf_counter()
        local.run(x)
        local_s.append(time.perf_counter() - t)
        if healthy is not None:
            healthy_s.append(healthy.infer(x).latency)
    return answers, local_s, healthy_s


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def windowed_throughput(client: MeshClient, images: np.ndarray, count: int, window: int) -> dict:
    start = time.monotonic()
    answers = list(client.stream((images[i % len(images)][None] for i in range(count)), window=window))
    seconds = time.monotonic() - start
    return {"window": window, "images_per_s": round(count / seconds, 1),
            "latency_ms": percentiles([a.latency for a in answers]),
            "consistent": sum(a.consistent for a in answers), "images": count}


def phase(answers, local_s, healthy_s=()) -> dict:
    mesh = [a.latency for a in answers]
    extra = {}
    if healthy_s:
        extra = {"healthy_mesh_latency_ms": percentiles(list(healthy_s)),
                 "ratio_to_healthy_mesh": round(statistics.median(m / h for m, h in zip(mesh, healthy_s)), 2)}
    return {**extra, "mesh_latency_ms": percentiles(mesh), "local_latency_ms": percentiles(local_s),
            "latency_ratio_p50": round(statistics.median(mesh) / statistics.median(local_s), 2),
            "mesh_images_per_s": round(len(mesh) / sum(mesh), 1),
            "local_images_per_s": round(len(local_s) / sum(local_s), 1),
            "failure_sets": sorted({str(a.failed) if a.consistent else a.status for a in answers}),
            **({"techniques": sorted({a.technique for a in answers})} if any(a.technique for a in answers) else {})}


def pipeline_analytic_bytes(manifest, live: list[int]) -> dict:
    """A pipeline / hybrid bundle's payload bytes per image for live boards `live` (float32, no headers):
    each live block's output to the next live block's live boards; the input to the first live block's;
    inside a hybrid group, each member's slice of every unit stage to the other live members."""
    blocks = [b for b in manifest.pipeline.blocks if set(b.boards) & set(live)]
    numel = lambda shape: int(np.prod(shape))                                          # noqa: E731
    cuts = sum(numel(a.output.shape) * 4 * len(set(b.boards) & set(live)) for a, b in zip(blocks, blocks[1:]))
    inside = 0
    for block in blocks:
        members = [b for b in block.boards if b in live]
        for s in block.stages:
            stage = manifest.stages[s]
            if stage.unit is not None and len(members) > 1:
                per_channel = numel(stage.shape) // stage.channels * 4
                inside += sum(len(stage.shards[b].channels) for b in members) * (len(members) - 1) * per_channel
    return {"board_to_board_minimum": cuts + inside, "cuts": cuts, "inside_groups": inside,
            "client_minimum": {"sent": numel(manifest.input.shape) * 4 * len(set(blocks[0].boards) & set(live)),
                               "received": numel(manifest.output.shape) * 4}}


def analytic_bytes(manifest, live: list[int]) -> dict:
    """Payload bytes per image for live boards `live`, from the manifest alone (no headers).

    The boards exchange every stage but the last (whose slices go to the client), or every stage when the
    bundle has a head. sent: what this protocol sends (each channel a board lacks once, by its lowest live
    holder: robustpart.traffic); minimum: each live board receives every channel a live peer holds and it
    does not, once; whole_slices: what sending each board's whole slice to each live peer would send.
    """
    if manifest.pipeline is not None:
        return pipeline_analytic_bytes(manifest, live)
    exchanged = manifest.stages if manifest.head else manifest.stages[:-1]
    value = 2 if manifest.wire == "fp16" else 4
    whole = sum(sum(len(stage.shards[b].channels) for b in live) * (len(live) - 1)
                * (int(np.prod(stage.shape)) // stage.channels * value) for stage in exchanged)
    rows = traffic_per_image(manifest, live)
    last = manifest.stages[-1]
    final = int(np.prod(manifest.output.shape)) * 4 if manifest.head else \
        len(set().union(*(last.shards[b].channels for b in live))) * int(np.prod(last.shape)) // last.channels * value
    return {"board_to_board_sent": sum(r["sent"] for r in rows),
            "board_to_board_minimum": sum(r["min_received"] for r in rows), "board_to_board_whole_slices": whole,
            "client_minimum": {"sent": int(np.prod(manifest.input.shape)) * 4 * len(live), "received": final},
            "messages_between_boards": len(exchanged) * len(live) * (len(live) - 1)}


def bytes_per_image(answers, manifest, live: list[int]) -> dict:
    """Measured bytes per image (frames as sent: 64-byte headers included) next to the analytic figures."""
    return {"client_sent": round(statistics.mean(a.sent_bytes for a in answers)),
            "client_received": round(statistics.mean(a.received_bytes for a in answers)),
            "board_to_board": round(statistics.mean(a.mesh_bytes for a in answers)),
            "analytic": analytic_bytes(manifest, live)}


def kill_run(bundle: Path, settings: MeshSettings, images: np.ndarray, local: LocalExecutor, workdir: Path,
             victim: int, before: int, after_s: float, window: int | None = None) -> dict:
    """A mesh that loses board `victim`, measured in alternation with the LocalExecutor and with a second,
    healthy mesh of the same bundle (the no-failure latency at the same moments)."""
    with LocalCluster(bundle, settings, workdir=workdir, verbose=False) as cluster, \
            LocalCluster(bundle, settings, workdir=workdir / "healthy", verbose=False) as reference:
        cluster.start()
        reference.start()
        cluster.wait_started()
        reference.wait_started()
        with MeshClient(bundle, inventory=cluster.inventory, settings=settings, deadline=10.0) as client, \
                MeshClient(bundle, inventory=reference.inventory, settings=settings, deadline=10.0) as healthy:
            client.wait_ready(20)
            healthy.wait_ready(20)
            paired_stream(client, local, images, count=20, healthy=healthy)   # warm-up
            result = {}
            pids = {b: p.pid for b, p in cluster.procs.items()}
            cpu0 = {b: cpu_seconds(pid) for b, pid in pids.items()}
            before_kill, before_local, before_healthy = paired_stream(client, local, images, count=before,
                                                                      healthy=healthy)
            cpu1 = {b: cpu_seconds(pid) for b, pid in pids.items()}
            result["no_failure"] = phase(before_kill, before_local, before_healthy)
            if None not in cpu0.values():
                result["no_failure"]["board_cpu_ms_per_image"] = {
                    b: round((cpu1[b] - cpu0[b]) / before * 1e3, 2) for b in pids}
            result["bytes_no_failure"] = bytes_per_image(before_kill, client.manifest, list(range(cluster.n)))
            if window:
                result["no_failure_pipelined"] = windowed_throughput(client, images, 2 * before, window)
            killed = {}
            answers, local_s, healthy_s = paired_stream(
                client, local, images, seconds=after_s, healthy=healthy,
                on_index=lambda i: i == 5 and killed.setdefault("t", cluster.kill(victim)))
            t_kill = killed["t"]
            survivors = [b for b in range(cluster.n) if b != victim]
            detect = {}
            for b in survivors:
                ts = [e["t"] for e in cluster.events(b)
                      if e["event"] == "dead" and e["peer"] == victim and e["t"] >= t_kill]
                detect[b] = round((min(ts) - t_kill) * 1e3, 1) if ts else None
            detected = t_kill + max(v for v in detect.values() if v is not None) / 1e3
            window_answers = [a for a in answers if a.submitted_at + a.latency > t_kill
                              and a.submitted_at < detected + settings.heartbeat]
            settled = [i for i, a in enumerate(answers) if a.submitted_at > detected + settings.heartbeat]
            result["detection_ms"] = detect
            taken = [e for b in survivors for e in cluster.events(b) if e["event"] == "takeover" and e["t"] >= t_kill]
            if taken:
                result["takeover"] = [{"board": e["board"], "took_over": e["peer"], "load_ms": e["load_ms"],
                                       "ready_after_kill_ms": round((e["t"] - t_kill) * 1e3, 1)} for e in taken]
            ready = max([e["t"] - t_kill for e in taken], default=0.0)
            until = max(2.0, ready + 1.5)            # past the takeover, however long a slow model's images take
            result["timeline"] = [{"t_ms": round((a.submitted_at - t_kill) * 1e3, 1),
                                   "latency_ms": round(a.latency * 1e3, 2),
                                   "answer": f"ok, failed={list(a.failed)}" if a.consistent else a.status,
                                   **({"technique": a.technique} if a.technique else {})}
                                  for a in answers if -0.2 < a.submitted_at - t_kill < until]
            result["detection_window"] = {
                "requests": len(window_answers),
                "latency_ms": [round(a.latency * 1e3, 1) for a in window_answers],
                "statuses": [a.status if not a.consistent else f"ok, failed={a.failed}" for a in window_answers]}
            result["whole_stream_after_kill"] = phase(answers, local_s, healthy_s)
            result["one_board_dead"] = phase([answers[i] for i in settled], [local_s[i] for i in settled],
                                             [healthy_s[i] for i in settled])
            result["bytes_one_board_dead"] = bytes_per_image([answers[i] for i in settled], client.manifest, survivors)
            if window:
                result["one_board_dead_pipelined"] = windowed_throughput(client, images, 2 * before, window)
    return result


def spurious(bundle: Path, settings: MeshSettings, images: np.ndarray, workdir: Path, seconds: float) -> dict:
    """A failure-free stream: any 'dead' event is a false detection (a slow board taken for a dead one)."""
    with LocalCluster(bundle, settings, workdir=workdir, verbose=False) as cluster:
        cluster.start().wait_started()
        with MeshClient(bundle, inventory=cluster.inventory, settings=settings, deadline=10.0) as client:
            client.wait_ready(20)
            start, answers = time.monotonic(), []
            while time.monotonic() - start < seconds:
                answers.append(client.infer(images[len(answers) % len(images)][None]))
        false = sum(e["event"] == "dead" for b in range(cluster.n) for e in cluster.events(b))
    return {"false_detections": false, "images": len(answers),
            "not_all_boards": sum(len(a.boards) != cluster.n or not a.consistent for a in answers),
            "mean_latency_ms": round(statistics.mean(a.latency for a in answers) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/fmnist_vgg16_bn-4d"))
    parser.add_argument("--images", type=int, default=200, help="images per no-failure phase (default 200)")
    parser.add_argument("--after-s", type=float, default=8.0, help="seconds streamed across and after the kill")
    parser.add_argument("--heartbeat-ms", type=float, default=100)
    parser.add_argument("--timeout-ms", type=float, default=500)
    parser.add_argument("--window", type=int, default=4, help="requests in flight for the pipelined figures")
    parser.add_argument("--sweep", help="liveness timeouts in ms for the Fig. 3 sweep, e.g. 50,100,200,400,800")
    parser.add_argument("--sweep-images", type=int, default=200, help="images per sweep point (default 200)")
    parser.add_argument("--victim", type=int, default=2, help="the board killed (default 2)")
    parser.add_argument("--no-takeover", action="store_true", help="boards do not take a dead board's shards over")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"{args.bundle} has no manifest.json; make it with: uv run robustpart compile "
                         f"fmnist_vgg16_bn --devices 4 --scores l1 --out {args.bundle}")
    local = LocalExecutor(args.bundle)
    if local.manifest.input.shape == (1, 28, 28):          # the reference VGG: real Fashion-MNIST images
        images, _ = load_inputs("bundled", local.manifest, 64)
    else:
        images = np.random.default_rng(0).standard_normal((16, *local.manifest.input.shape)).astype(np.float32)
    settings = MeshSettings.from_ms(args.heartbeat_ms, args.timeout_ms, takeover=not args.no_takeover)
    results = {"bundle": str(args.bundle), "boards": local.manifest.boards,
               "settings_ms": {"heartbeat": args.heartbeat_ms, "timeout": args.timeout_ms}}
    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp:
        results["kill"] = kill_run(args.bundle, settings, images, local, Path(tmp) / "kill", victim=args.victim,
                                   before=args.images, after_s=args.after_s, window=args.window)
        if args.sweep:
            results["sweep"] = []
            for timeout in [float(t) for t in args.sweep.split(",")]:
                swept = MeshSettings.from_ms(max(timeout / 5, 5.0), timeout, takeover=not args.no_takeover)
                point = {"timeout_ms": timeout, "heartbeat_ms": swept.heartbeat * 1e3}
                point.update(sweep_point(args.bundle, swept, images, local, Path(tmp) / f"sweep{timeout:g}",
                                         args.sweep_images))
                point["no_failure"] = spurious(args.bundle, swept, images, Path(tmp) / f"clean{timeout:g}",
                                               seconds=point.pop("stream_seconds"))
                results["sweep"].append(point)
                print(json.dumps(point), flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def sweep_point(bundle: Path, settings: MeshSettings, images: np.ndarray, local: LocalExecutor, workdir: Path,
                n: int) -> dict:
    """n images, one board killed before image 10: mean latency per image (the stall amortised, as in
    Fig. 3) and the worst single request, against the same stream's LocalExecutor."""
    with LocalCluster(bundle, settings, workdir=workdir, verbose=False) as cluster:
        cluster.start().wait_started()
        with MeshClient(bundle, inventory=cluster.inventory, settings=settings, deadline=10.0) as client:
            client.wait_ready(20)
            paired_stream(client, local, images, count=20)
            start = time.monotonic()
            answers, local_s, _ = paired_stream(client, local, images, count=n,
                                             on_index=lambda i: i == 10 and cluster.kill(3))
            seconds = time.monotonic() - start
    lat = [a.latency for a in answers]
    return {"mean_latency_ms": round(statistics.mean(lat) * 1e3, 2), "max_latency_ms": round(max(lat) * 1e3, 1),
            "p50_latency_ms": round(statistics.median(lat) * 1e3, 2),
            "local_mean_ms": round(statistics.mean(local_s) * 1e3, 2),
            "consistent": sum(a.consistent for a in answers), "images": n, "stream_seconds": seconds}


if __name__ == "__main__":
    main()
