"""A small shared timer: warm-up, repeats, median and inter-quartile range.

On CUDA every sample is bracketed by CUDA events and the device is synchronised
before the first event and after the last, so a sample is the GPU time of the work
launched in between. On CPU a sample is wall time (``time.perf_counter``).

Two entry points:

* :func:`measure` times a callable ``repeats`` times after ``warmup`` untimed calls.
* :class:`Stopwatch` times a region inside a loop you write yourself (the e2e bench
  times prefill and each decode step of one ``generate`` call that way).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Stopwatch", "Timing", "measure", "summarize", "synchronize"]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Summary of timed samples, in seconds."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    first_s: float | None = None  # the first (warm-up) call: compile / allocation cost
    samples_s: tuple[float, ...] = field(default=(), repr=False)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_dict(self) -> dict[str, Any]:
        """Milliseconds, rounded to the microsecond, for JSON reports."""

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 3)

        return {
            "median_ms": ms(self.median_s),
            "q1_ms": ms(self.q1_s),
            "q3_ms": ms(self.q3_s),
            "iqr_ms": ms(self.iqr_s),
            "min_ms": ms(self.min_s),
            "max_ms": ms(self.max_s),
            "first_ms": ms(self.first_s),
            "repeats": self.repeats,
            "warmup": self.warmup,
        }


def summarize(samples: Sequence[float], *, warmup: int = 0, first_s: float | None = None) -> Timing:
    """Median and quartiles (inclusive method) of ``samples`` (seconds)."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    values = sorted(float(s) for s in samples)
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Timing(
        median_s=statistics.median(values),
        q1_s=q1,
        q3_s=q3,
        min_s=values[0],
        max_s=values[-1],
        repeats=len(values),
        warmup=warmup,
        first_s=first_s,
        samples_s=tuple(samples),
    )


class Stopwatch:
    """Times regions on one device: ``start()`` ... ``stop() -> seconds``.

    CUDA: events recorded on the current stream, synchronised at ``stop``. CPU: wall time.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._t0 = 0.0
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def lap(self) -> float:
        """Seconds since ``start`` (or the previous lap); restarts the clock."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize(self.device)
            seconds = float(self._start.elapsed_time(end)) / 1e3
            self._start = end
            return seconds
        now = time.perf_counter()
        seconds, self._t0 = now - self._t0, now
        return seconds

    def stop(self) -> float:
        """Seconds since ``start``."""
        return self.lap()


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` timed times.

    ``setup`` (untimed) runs before every call, e.g. to clear gradients. The first
    warm-up call's time is kept as ``first_s`` (compilation shows up there).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    watch = Stopwatch(device)
    first: float | None = None
    samples: list[float] = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        watch.start()
        fn()
        seconds = watch.stop()
        if i == 0:
            first = seconds
        if i >= warmup:
            samples.append(seconds)
    return summarize(samples, warmup=warmup, first_s=first)
