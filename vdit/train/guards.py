"""Fault guards of the training loop: preemption notices and runs of non-finite steps."""

from __future__ import annotations

import signal
import threading
from collections import deque

import jax


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many bad steps, a failed save); the message says why."""


class PreemptionWatch:
    """SIGTERM / SIGINT (a preemption notice) set a flag; the loop finishes its step, saves and
    exits. On several processes all of them stop at the same step: JAX's preemption sync point
    (the coordination service's notice) decides, so no host saves a step the others skip."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal is not None


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; raises after `limit` in a row, naming the
    steps and the source ids of the batches that produced them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[int] = []  # the current run of consecutive skipped steps
        self.sources: deque = deque(maxlen=4)  # (step, source ids) of recent batches

    def remember(self, step: int, source_ids) -> None:
        self.sources.append((step, [int(s) for s in source_ids]))

    def observe(self, step: int, skipped: bool) -> str | None:
        """Record step's outcome; returns the stop message once the limit is reached."""
        if not skipped:
            self.run = []
            return None
        self.run.append(step)
        if len(self.run) < self.limit:
            return None
        ids = dict(self.sources).get(step, "unknown")
        return (f"loss or gradients were not finite at steps {self.run[0]}-{step} "
                f"({len(self.run)} in a row, train.max_bad_steps={self.limit}); those updates "
                f"were skipped. Source ids (clip seeds) of step {step}'s batch: {ids}")
