"""Progress for whoever watches, chosen in one place: tqdm bars on a terminal; on a log (stderr not a
terminal: CI, `make run > log`, nohup) plain lines instead -- one per phase, and in a loop at most one every
few seconds -- because a bar's carriage returns make one unreadable line of a log, and tqdm on a log shows
nothing at all, so a run that builds its base for minutes looked hung (issue 34)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

EVERY_S = 5.0  # the fewest seconds between two lines of a loop on a log


def on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def phase(text: str, enabled: bool = True, stream=None) -> None:
    """`text` as one line on a log (a run's phase: loading the base, evaluating, ...); nothing on a terminal,
    where the bars show what runs, nor when progress is off. Phases are few, so they are not rate-limited."""
    stream = stream or sys.stderr
    if enabled and not on_terminal(stream):
        print(text, file=stream, flush=True)


class Lines:
    """A loop's progress on a log: "<desc> k/N after T s: <postfix>" when a step ends at least `every_s`
    seconds after the previous line (or the loop's start), and at the last step."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, initial: int, stream, clock, every_s: float):
        self.iterable, self.desc, self.total, self.initial = iterable, desc, total, initial
        self.stream, self.clock, self.every_s = stream, clock, every_s
        self.postfix = ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def set_postfix(self, **values) -> None:
        self.set_postfix_str(", ".join(f"{k} {v}" for k, v in values.items()))

    def __iter__(self):
        start = last = self.clock()
        n = self.initial
        for item in self.iterable:
            yield item
            n += 1
            now = self.clock()
            if now - last >= self.every_s or n == self.total:
                of = f"/{self.total}" if self.total is not None else ""
                tail = f": {self.postfix}" if self.postfix else ""
                print(f"{self.desc} {n}{of} after {now - start:.0f} s{tail}", file=self.stream, flush=True)
                last = now


def steps(iterable: Iterable, desc: str, *, total: int | None = None, initial: int = 0, unit: str = "it",
          enabled: bool = True, leave: bool = True, log: bool = True, stream=None, clock=None,
          every_s: float | None = None):
    """`iterable` with its progress shown: a tqdm bar on a terminal; on a log, `Lines` when `log` (off for
    loops inside a phase, such as the clients of one round: their phase's lines say enough); nothing when
    `enabled` is False. Either has `set_postfix_str` and `set_postfix`. `clock` (time.monotonic) and `every_s`
    (EVERY_S) are there for tests."""
    stream = stream or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)
    if enabled and on_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=leave, file=stream)
    if enabled and log:
        return Lines(iterable, desc, total, initial, stream, clock or time.monotonic, EVERY_S if every_s is None else every_s)
    return _Quiet(iterable)


class _Quiet:
    """No progress shown: the loop as it is, with postfixes ignored."""

    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix_str(self, text: str) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass
