"""The bound on short-request-first scheduling: deferred work keeps a set share of the engine's time.

Short requests go first (the scheduler parks a long file's decoding rows, pauses its encodes and holds its waiting
chunks back while shorter requests run), which keeps a 5 s request near its idle latency during a long file. Left
unbounded, a steady stream of short requests starves the long file (a 5-minute file took 144 s next to back-to-back
5 s requests instead of 24 s alone). `FairShare` bounds that: whenever the scheduler would defer work for shorter
requests, the engine time of that step is "taken" from the deferred work; once it has taken more than
`(1 - share) / share` times the time the deferred work was served, plus a burst allowance of `grace_seconds`, the
deferred work gets its turn (nothing is deferred: it runs beside the short requests) until the ratio is restored.

So while anything is deferred, it gets at least `share` of the engine's time over any stretch longer than about
`grace_seconds / share`; `share = 0` is pure short-first (unbounded), `share = 1` never defers.
"""

from __future__ import annotations

DEFAULT_SHARE = 0.25  # measured: bench/fairness.py (README, Benchmarks)
DEFAULT_GRACE_SECONDS = 3.0


class FairShare:
    def __init__(self, share: float = DEFAULT_SHARE, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"long_request_share must be within [0, 1], got {share!r}")
        self.share, self.grace = share, grace_seconds
        self.taken = 0.0  # engine seconds of steps that deferred work for shorter requests
        self.served = 0.0  # engine seconds of steps in which work that wanted deferring was not deferred
        self.turn = share >= 1.0  # the deferred work's turn: defer nothing

    def allow_defer(self) -> bool:
        """May the scheduler defer work for shorter requests in this step?"""
        return not self.turn

    def record(self, seconds: float, contended: bool) -> None:
        """Account one step: `contended` when the policy wanted to defer something in it (deferred or not)."""
        if not contended or self.share <= 0.0:
            return
        if self.turn:
            self.served += seconds
        else:
            self.taken += seconds
        if self.share >= 1.0:
            return
        ratio = (1.0 - self.share) / self.share
        if self.turn and self.taken <= ratio * self.served:
            self.turn = False  # caught up: short requests first again
        elif not self.turn and self.taken > ratio * self.served + self.grace:
            self.turn = True

    def reset(self) -> None:
        """Nothing is waiting any more: start the next contention afresh."""
        self.taken = self.served = 0.0
        self.turn = self.share >= 1.0
