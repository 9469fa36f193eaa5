"""The floor of a board's CPU per image in a Python + pyzmq mesh: the bundle's message pattern, and nothing else.

N processes, each with the mesh's own sockets (one ROUTER in, one DEALER per peer: runtime/mesh/transport.py),
play a horizontal bundle's exchange for every image with no state machine, no shards and no assembly: per
exchanged stage, each board sends each peer a 64-byte header and the payload it sends in the real mesh (the
channels it is designated for, robustpart.traffic), then waits for one message from each peer. What each
process spends per image is what any board of this design spends before it computes or decides anything;
`bench_mesh.py` measures the real boards, which pay this plus the state machine and ONNX Runtime.

    uv run robustpart compile fmnist_vgg16_bn --devices 4 --scores l1 --out /tmp/vgg4
    uv run python benchmarks/bench_wire_floor.py --bundle /tmp/vgg4 --images 500
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from robustpart.runtime.mesh.protocol import HEADER_BYTES


def payload_sizes(bundle: Path) -> list[list[list[int]]]:
    """[stage][sender][receiver] -> payload bytes the real mesh sends (each channel once, fp32 or fp16)."""
    from robustpart.runtime.manifest import load_manifest
    from robustpart.runtime.mesh.senders import StageSenders
    manifest = load_manifest(bundle, verify=False)
    n = manifest.boards
    exchanged = manifest.stages if manifest.head else manifest.stages[:-1]
    value = 2 if manifest.wire == "fp16" else 4
    sizes = []
    for stage in exchanged:
        senders = StageSenders(tuple(s.channels for s in stage.shards), stage.channels)
        per_channel = int(np.prod(stage.shape)) // stage.channels * value
        everyone = (1 << n) - 1
        sizes.append([[len(senders.pick(b, r, everyone)[0]) * per_channel if r != b else 0 for r in range(n)]
                      for b in range(n)])
    return sizes


def board(me: int, endpoints: list[str], sizes, images: int, ready, go, out) -> None:
    import zmq

    from robustpart.runtime.mesh.transport import Sender, dealer, receive, router
    context = zmq.Context(io_threads=1)
    inbox = router(context, endpoints[me], 1000)
    peers = {p: dealer(context, e, 1000) for p, e in enumerate(endpoints) if p != me}
    sender = Sender()
    payloads = [[[bytes(HEADER_BYTES), bytes(row[me][r])] for r in range(len(row))] for row in sizes]
    # every peer connected before the clock starts: a round of hellos
    for p, sock in peers.items():
        while not sender.send(sock, [b"hello"], "hello"):
            time.sleep(0.01)
    got = 0
    while got < len(peers):
        if inbox.poll(100):
            receive(inbox)
            got += 1
    ready.set()
    go.wait()

    def exchange() -> None:
        for stage in payloads:
            for p, sock in peers.items():
                sender.send(sock, stage[p], "slices")
            for _ in peers:
                inbox.poll(1000)
                receive(inbox)

    for _ in range(20):                    # warm-up
        exchange()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(images):
        exchange()
    out.put((me, (time.process_time() - cpu) / images, (time.perf_counter() - wall) / images,
             sender.stats["dropped_slices"]))
    for sock in (inbox, *peers.values()):
        sock.close(0)
    context.term()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a horizontal bundle")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--port", type=int, default=47800)
    args = parser.parse_args(argv)
    sizes = payload_sizes(args.bundle)
    n = len(sizes[0])
    endpoints = [f"tcp://127.0.0.1:{args.port + b}" for b in range(n)]
    ready = [mp.Event() for _ in range(n)]
    go, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=board, args=(b, endpoints, sizes, args.images, ready[b], go, out)) for b in range(n)]
    for p in procs:
        p.start()
    for e in ready:
        e.wait(30)
    go.set()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(30)
    messages = len(sizes) * (n - 1)
    report = {"bundle": str(args.bundle), "boards": n, "exchanged_stages": len(sizes), "images": args.images,
              "messages_sent_per_board_per_image": messages, "cpu_count": os.cpu_count(),
              "board_cpu_ms_per_image": {b: round(cpu * 1e3, 3) for b, cpu, _, _ in results},
              "wall_ms_per_image": round(max(w for _, _, w, _ in results) * 1e3, 3),
              "us_per_message_sent_and_received": round(max(c for _, c, _, _ in results) / (2 * messages) * 1e6, 2),
              "dropped": sum(d for *_, d in results)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
