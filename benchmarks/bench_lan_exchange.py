"""How fast the emulated LAN of bench_lan.py moves bytes by itself: N processes, each in its own network
namespace behind the same shaped veth pairs, exchange a fixed payload with every other one per round over
ZeroMQ (the mesh's DEALER -> ROUTER sockets, no compute, no state machine), and each prints its time per
round against the bound: the bytes one process sends per round / the link rate.

What the mesh's wire bound assumes is that a link carries its rate; this says how close plain ZeroMQ over
these shaped links gets (README, "On an emulated 1 Gbit/s LAN"). Needs root, `ip` and `tc`.

    sudo uv run python benchmarks/bench_lan_exchange.py [--boards 4] [--mb 9] [--rounds 5] [--rate 1gbit]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))     # the network namespaces helper

PORT = 6000


def exchange(me: int, boards: int, payload_mb: float, rounds: int, subnet: str) -> list[float]:
    """This process's part: per round, send the payload to every peer, then wait for every peer's."""
    import numpy as np
    import zmq
    from robustpart.runtime.mesh.transport import dealer, receive, router
    context = zmq.Context()
    inbox = router(context, f"tcp://{subnet}.{me + 1}:{PORT}", 1000)
    peers = [dealer(context, f"tcp://{subnet}.{p + 1}:{PORT}", 1000) for p in range(boards) if p != me]
    payload = np.ones(int(payload_mb * 1e6), np.uint8)

    def gather() -> None:
        got = 0
        while got < len(peers):
            inbox.poll(10_000)
            try:
                while True:
                    receive(inbox)
                    got += 1
            except zmq.Again:
                pass

    time.sleep(1.0)                                     # every process listening
    for sock in peers:                                  # a first round of greetings: all connected
        sock.send(b"hello")
    gather()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for sock in peers:
            sock.send(payload, copy=False)
        gather()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", type=int, default=4)
    parser.add_argument("--mb", type=float, default=9.0, help="payload per peer per round, MB (default 9)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--burst", default="256kb")
    parser.add_argument("--unshaped", action="store_true", help="no tc qdisc: what the machine itself moves")
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)          # the part run in a namespace
    parser.add_argument("--subnet", default="10.231.78", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        print(json.dumps({"board": args.peer, "round_ms": [round(s * 1e3, 1) for s in
                                                           exchange(args.peer, args.boards, args.mb, args.rounds,
                                                                    args.subnet)]}), flush=True)
        return

    from bench_lan import rate_bits_per_s, shape
    from netns import Namespaces, netns_unavailable
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"bench_lan_exchange needs network namespaces: {reason}")
    spaces = Namespaces(args.boards, subnet=args.subnet)
    bound_ms = (args.boards - 1) * args.mb * 8e6 / rate_bits_per_s(args.rate) * 1e3
    try:
        spaces.up()
        if not args.unshaped:
            shape(spaces, args.rate, args.burst)
        parts = [subprocess.Popen(["ip", "netns", "exec", spaces.ns[k], sys.executable, __file__, "--peer", str(k),
                                   "--boards", str(args.boards), "--mb", str(args.mb), "--rounds", str(args.rounds),
                                   "--subnet", args.subnet], stdout=subprocess.PIPE, text=True)
                 for k in range(args.boards)]
        results = [json.loads(p.communicate(timeout=600)[0]) for p in parts]
    finally:
        spaces.down()
    every = [ms for r in results for ms in r["round_ms"]]
    print(json.dumps({"boards": args.boards, "payload_mb_per_peer": args.mb,
                      "rate": "unshaped" if args.unshaped else args.rate, "bound_ms": round(bound_ms, 1),
                      "round_ms": {r["board"]: r["round_ms"] for r in results},
                      "min_over_bound": round(min(every) / bound_ms, 2),
                      "max_over_bound": round(max(every) / bound_ms, 2)}, indent=1))


if __name__ == "__main__":
    main()
