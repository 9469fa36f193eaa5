"""`robustpart serve --metrics HOST:PORT`: a board's Prometheus metrics over HTTP (prometheus_client).

    robustpart_requests_answered_total      requests this board answered (sent the client its part of)
    robustpart_answer_seconds               histogram: a request's arrival at this board to its answer
    robustpart_stage_wait_seconds           histogram: own slice of a stage out to the stage assembled
    robustpart_events_total{event}          liveness events: dead (a detection), joined, rejoined,
                                            restarted, takeover, released, client, ...
    robustpart_sent_bytes_total, robustpart_received_bytes_total, robustpart_{sent,received}_messages_total
    robustpart_dropped_sends_total{what}    sends dropped (a full queue, an unknown client): slices, results...
    robustpart_discarded_total{reason}      messages received and not used: late, stale, malformed, ...
    robustpart_stage_timeouts_total         stages assembled without a live board's slice
    robustpart_peers_alive                  the peers this board hears now
    robustpart_board_info{board,boards,incarnation,bundle}   1

The counters are read from the board's own counters when Prometheus scrapes (no bookkeeping per message);
the histograms are fed from the state machine's timings once per loop turn.
"""
from __future__ import annotations

from ...errors import MeshError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TRAFFIC = ("sent_bytes", "received_bytes", "sent_messages", "received_messages")


def parse_metrics_address(text: str) -> tuple[str, int]:
    """HOST:PORT or PORT (every interface) -> (host, port); raises MeshError for anything else."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise MeshError(f"--metrics {text!r} is not HOST:PORT or PORT (e.g. 0.0.0.0:9100)")
    return host, int(port)


class BoardMetrics:
    """The metrics of one board process, served at `address` until `close()`."""

    def __init__(self, address: str, board: int, boards: int, incarnation: int, bundle_id: str, machine):
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
        except ImportError as exc:
            raise MeshError("--metrics needs the prometheus_client package: pip install 'robustpart[runtime]'") \
                from exc
        host, port = parse_metrics_address(address)
        self.registry = CollectorRegistry()
        self.answers = Histogram("robustpart_answer_seconds", "A request's arrival at this board to its answer",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_waits = Histogram("robustpart_stage_wait_seconds", "Own slice of a stage sent to the stage "
                                     "assembled (waiting for the peers' slices)", buckets=LATENCY_BUCKETS,
                                     registry=self.registry)
        self.events = Counter("robustpart_events", "Liveness and takeover events (dead: a detection)", ["event"],
                              registry=self.registry)
        self.registry.register(_BoardCollector(machine, board, boards, incarnation, bundle_id))
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise MeshError(f"cannot serve metrics at {host}:{port} ({exc}); give --metrics another port") from exc
        self.address = f"{host}:{self.server.server_port}"

    def observe(self, timings) -> None:
        """Feed the machine's (name, seconds) timings into the histograms, emptying them."""
        while timings:
            name, seconds = timings.popleft()
            (self.answers if name == "answer" else self.stage_waits).observe(seconds)

    def event(self, name: str) -> None:
        self.events.labels(event=name).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _BoardCollector:
    """The board's counters, read at scrape time (a copy of the dict: the loop goes on changing it)."""

    def __init__(self, machine, board: int, boards: int, incarnation: int, bundle_id: str):
        self.machine, self.labels = machine, {"board": str(board), "boards": str(boards),
                                              "incarnation": str(incarnation), "bundle": bundle_id[:12]}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        stats, m = dict(self.machine.stats), self.machine
        info = GaugeMetricFamily("robustpart_board_info", "This board process", labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1)
        yield info
        yield CounterMetricFamily("robustpart_requests_answered", "Requests this board answered", m.answered)
        for name in _TRAFFIC:
            yield CounterMetricFamily(f"robustpart_{name}", f"{name.replace('_', ' ').capitalize()} of this board",
                                      stats.get(name, 0))
        yield CounterMetricFamily("robustpart_stage_timeouts", "Stages assembled without a live board's slice",
                                  stats.get("stage_timeouts", 0))
        dropped = CounterMetricFamily("robustpart_dropped_sends", "Sends dropped (full queue, unknown client)",
                                      labels=["what"])
        discarded = CounterMetricFamily("robustpart_discarded", "Messages received and not used", labels=["reason"])
        for key, value in sorted(stats.items()):
            if key in _TRAFFIC or key == "stage_timeouts":
                continue
            if key.startswith("dropped_") and key != "dropped_pending":
                dropped.add_metric([key.removeprefix("dropped_")], value)
            else:
                discarded.add_metric([key], value)
        yield dropped
        yield discarded
        yield GaugeMetricFamily("robustpart_peers_alive", "Peers this board hears now", len(m.liveness.alive()))
