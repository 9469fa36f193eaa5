"""Timing and queue settings shared by boards and clients, with defaults that suit a LAN of boards.

The trade-off (paper 003, Fig. 3): a short `timeout` notices a dead board sooner, so fewer requests wait
for it, but a board that is only slow (busy CPU, congested link) is then declared dead spuriously; a long
one never misfires but stalls every request in flight when a board dies, for up to `timeout`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError


@dataclass(frozen=True)
class MeshSettings:
    heartbeat: float = 0.1            # seconds between heartbeats (any data also counts as one)
    timeout: float = 0.5              # a peer silent this long is marked dead and no longer waited for
    stage_timeout: float | None = None   # how long a stage waits for a live peer's slice (default: timeout)
    hwm: int = 1000                   # per-connection queue bound (messages); beyond it sends are dropped
    max_pending: int = 256            # slices buffered for requests whose input has not arrived yet
    client_idle: float = 60.0         # a board forgets a client silent this long (it greets again first)
    takeover: bool = True             # a live backup loads a dead board's shards and computes its channels

    def __post_init__(self):
        if not 0 < self.heartbeat < self.timeout:
            raise ConfigError(f"need 0 < heartbeat < timeout (got heartbeat {self.heartbeat * 1e3:g} ms, "
                                  f"timeout {self.timeout * 1e3:g} ms): a peer must get several heartbeats in "
                                  f"before it is declared dead")
        if self.stage_timeout is not None and self.stage_timeout <= 0:
            raise ConfigError(f"the stage timeout must be > 0 ms, got {self.stage_timeout * 1e3:g}")
        if self.client_idle <= self.timeout:
            raise ConfigError(f"the client idle limit ({self.client_idle * 1e3:g} ms) must exceed the timeout")
        if self.hwm < 1 or self.max_pending < 1:
            raise ConfigError("hwm and max_pending must be >= 1")

    @property
    def wait(self) -> float:
        return self.timeout if self.stage_timeout is None else self.stage_timeout

    @classmethod
    def from_ms(cls, heartbeat_ms: float | None = None, timeout_ms: float | None = None,
                stage_timeout_ms: float | None = None, client_idle_ms: float | None = None,
                takeover: bool = True) -> "MeshSettings":
        default = cls()
        return cls(heartbeat=default.heartbeat if heartbeat_ms is None else heartbeat_ms / 1e3,
                   timeout=default.timeout if timeout_ms is None else timeout_ms / 1e3,
                   stage_timeout=None if stage_timeout_ms is None else stage_timeout_ms / 1e3,
                   client_idle=default.client_idle if client_idle_ms is None else client_idle_ms / 1e3,
                   takeover=takeover)

    def as_args(self) -> list[str]:
        """The same settings as `robustpart serve` options (for starting boards)."""
        args = ["--heartbeat-ms", f"{self.heartbeat * 1e3:g}", "--timeout-ms", f"{self.timeout * 1e3:g}"]
        if self.stage_timeout is not None:
            args += ["--stage-timeout-ms", f"{self.stage_timeout * 1e3:g}"]
        if self.client_idle != MeshSettings.client_idle:
            args += ["--client-idle-ms", f"{self.client_idle * 1e3:g}"]
        if not self.takeover:
            args.append("--no-takeover")
        return args
