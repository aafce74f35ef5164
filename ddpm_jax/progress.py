"""Progress bars of the commands, counted in what the user asked for (images, steps), shown on
process 0 only, on stderr."""

from __future__ import annotations

import time
from typing import Any

import jax
from tqdm import tqdm


class _Silent:
    """A bar that shows nothing (other processes, or progress not asked for)."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar over `total` `unit`s (its `update(n)` adds n), or a silent one."""
    if not enabled or jax.process_index() != 0:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def format_seconds(seconds: float) -> str:
    """`42 s`, `3m05s`, `2h07m`: durations as a person reads them."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class TrainingProgress:
    """The progress lines of a training run and the times of its end summary.

    Speed and ETA come from training time alone: sample grids and FID evaluations are timed
    apart (`evaluation`), so they never swing the ETA; the line adds what the evaluations
    still to come will take, once one has been timed. A line is logged at most every
    `every_seconds`, at logging steps.
    """

    def __init__(self, first_step: int, num_train_steps: int, batch_size: int,
                 every_seconds: float = 30.0):
        self._clock = time.perf_counter
        self.first_step, self.num_train_steps = first_step, num_train_steps
        self.batch_size, self.every_seconds = batch_size, every_seconds
        self.started = self._clock()
        self.evaluation_seconds: dict[str, float] = {}  # kind -> total seconds
        self.excluded_seconds = 0.0  # every evaluation, finished or abandoned
        self.evaluation_counts: dict[str, int] = {}
        self._latest_evaluation: dict[str, float] = {}  # the first one also compiles
        self._last_line: float | None = None

    def evaluation(self, kind: str, seconds: float, counted: bool = True) -> None:
        """Records one evaluation of `kind` ("sample grid", "FID") that took `seconds`, kept
        out of the training speed; `counted=False`: a stop request abandoned it."""
        self.excluded_seconds += seconds
        if not counted:
            return
        self.evaluation_seconds[kind] = self.evaluation_seconds.get(kind, 0.0) + seconds
        self.evaluation_counts[kind] = self.evaluation_counts.get(kind, 0) + 1
        self._latest_evaluation[kind] = seconds

    def training_seconds(self) -> float:
        """Wall time since the loop started, less the evaluations."""
        return self._clock() - self.started - self.excluded_seconds

    def line(self, step: int, loss: float, evaluations_left: dict[str, int]) -> str | None:
        """The progress line at `step`, or None when the last one is too recent.

        `evaluations_left` counts the evaluations of each kind still to come.
        """
        now = self._clock()
        if self._last_line is not None and now - self._last_line < self.every_seconds:
            return None
        self._last_line = now
        done = step - self.first_step
        seconds = self.training_seconds()
        rate = done / seconds if seconds > 0 and done > 0 else 0.0
        text = (f"step {step}/{self.num_train_steps} ({100 * step / self.num_train_steps:.0f}%): "
                f"loss {loss:.4f}, {rate:.2f} steps/s ({rate * self.batch_size:.1f} images/s)")
        if rate <= 0:
            return text
        text += f", ETA {format_seconds((self.num_train_steps - step) / rate)} of training"
        to_come = [(kind, count, self._latest_evaluation[kind])
                   for kind, count in evaluations_left.items()
                   if count and kind in self._latest_evaluation]
        for kind, count, each in to_come:
            text += f" + {format_seconds(count * each)} for {count} {kind}{'s' if count > 1 else ''}"
        return text
