"""Graceful stops: SIGTERM (preemption) or SIGINT (Ctrl-C) end the run after the current call
of the train step (one step, or `steps_per_dispatch` steps), or after the current chunk of
sampler steps when a sample grid or an in-loop FID is running (that evaluation is abandoned).

One process: both signals set a flag that the loop (and the sampler, between chunks) reads;
the loop then saves a checkpoint, flushes logs and returns normally. A second Ctrl-C
interrupts at once. Several processes: JAX's distributed runtime catches SIGTERM, and
`multihost_utils.reached_preemption_sync_point` makes every process agree on the same check
to stop at, so all of them save the same checkpoint (Ctrl-C is left to its default there:
processes would not see it at the same check). Every process makes the same sequence of
checks, so a counter of them is the sync point's step.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Call `should_stop()` after each train call (and sampler chunk); use as a context
    manager to restore the signal handlers."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._multi_process = jax.process_count() > 1
        self._previous: dict[int, object] = {}
        self._checks = 0
        signals = () if self._multi_process else (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self._requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested.set()
        logging.warning("received %s: stopping after the current train call (or sampler chunk), with a "
                        "checkpoint",
                        signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Whether to stop now; every process gets the same answer at the same check."""
        self._checks += 1
        if self._multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(self._checks)
            except RuntimeError:  # runtime started without the preemption service
                return False
        return self._requested.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
