"""Who takes over a dead board's shards: plain logic on the manifest's backup lists (no numpy, no sockets).

Every board's shards are also stored, on disk, by its backups (`compile --backups K`: the K boards after it
in ring order, by default every other board). When boards die, each dead board's work goes to one live
backup: the dead boards in id order, each to the live backup that has taken over the fewest parameter
bytes so far (the earlier in the dead board's list on a tie). The rule is deterministic in the failure set
and the manifest, so every board computes the same assignment from its own view, with no agreement round.
With a per-board memory budget, a backup that would exceed it does not take the board over.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def ring_backups(n_boards: int, k: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Per board, the `k` boards after it in ring order (default: every other board)."""
    k = n_boards - 1 if k is None else k
    if not 0 <= k < n_boards:
        raise ValueError(f"--backups must be 0..{n_boards - 1} for {n_boards} boards, got {k}")
    return tuple(tuple((d + i) % n_boards for i in range(1, k + 1)) for d in range(n_boards))


def assign_takeovers(backups: Sequence[Sequence[int]], failed: Iterable[int], param_bytes: Sequence[int],
                     budget: int | None = None) -> dict[int, int]:
    """{dead board: the live board that takes its shards over} for failure set `failed`; a dead board none
    of whose backups is alive (or within `budget` bytes of parameters, its own included) is left out."""
    failed = set(failed)
    taken = [0] * len(param_bytes)
    out = {}
    for dead in sorted(failed):
        order = list(backups[dead])
        live = [b for b in order if b not in failed
                and (budget is None or param_bytes[b] + taken[b] + param_bytes[dead] <= budget)]
        if not live:
            continue
        taker = min(live, key=lambda b: (taken[b], order.index(b)))
        taken[taker] += param_bytes[dead]
        out[dead] = taker
    return out


def eligible_backups(backups: Sequence[Sequence[int]], groups: Sequence[Sequence[int]] | None = None
                     ) -> tuple[tuple[int, ...], ...]:
    """Per board, the backups that may take it over: all of them in a horizontal bundle (`groups` None); in
    a pipeline / hybrid one (`groups`: each block's boards), those of its group when the group has other
    boards (which compute its slices too), any when it is alone in its block (the backup computes the
    block for it)."""
    if groups is None:
        return tuple(tuple(b) for b in backups)
    group_of = {board: tuple(group) for group in groups for board in group}
    return tuple(tuple(backups[d]) if len(group_of.get(d, (d,))) == 1 else
                 tuple(b for b in backups[d] if b in group_of[d]) for d in range(len(backups)))


def storage_bytes(backups: Sequence[Sequence[int]], file_bytes: Sequence[int]) -> list[int]:
    """Per board, the shard bytes it keeps on disk: its own and those of every board it backs up."""
    stored = list(file_bytes)
    for board, holders in enumerate(backups):
        for holder in holders:
            stored[holder] += file_bytes[board]
    return stored


def most_taken_over(backups: Sequence[Sequence[int]], param_bytes: Sequence[int],
                    budget: int | None = None) -> list[int]:
    """Per board, the most parameter bytes it takes over under any failure set it survives (the sets of
    1..N-1 boards; N <= 8 in practice, so every set is tried)."""
    n = len(param_bytes)
    most = [0] * n
    for mask in range(1, (1 << n) - 1):
        failed = [b for b in range(n) if mask >> b & 1]
        taken = [0] * n
        for dead, taker in assign_takeovers(backups, failed, param_bytes, budget).items():
            taken[taker] += param_bytes[dead]
        most = [max(m, t) for m, t in zip(most, taken)]
    return most
