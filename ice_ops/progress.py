"""Progress of long engine calls on a text stream: a bar on a terminal, a few plain lines elsewhere, nothing when quiet.

``ProgressReporter(stream).phase("object tokens")`` returns a ``callback(step, total, preview)`` with the shape
every engine entry point takes (``localize``, ``learn_object_tokens``, ``learn_intrinsic_tokens``,
``compose.generate``). On a terminal the phase redraws one line in place (``\\r``) and ends it when the last
step arrives; on a pipe or a log file it writes a line each time another quarter of the phase is done, so a
log holds a few lines per phase rather than one per step. Pure Python, no dependency.

A callback may also carry a ``check_cancel()`` method: the engine calls it through :func:`cancel_point`
inside a step (before a backward pass, between the UNet passes of Stage One), so that a host such as ComfyUI
can stop a run sooner than the next ``callback`` call.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .defaults import Callback

BAR_WIDTH = 30  # characters between the brackets
BAR_FILLED = "#"
BAR_EMPTY = "."
PLAIN_REPORTS_PER_PHASE = 4  # plain lines at 25 %, 50 %, 75 % and 100 % of a phase
SECONDS_PER_MINUTE = 60


def cancel_point(callback: object) -> None:
    """Let the caller stop the engine here: call ``callback.check_cancel()`` when the callback has one (it
    raises to stop); plain functions have none and nothing happens."""
    check_cancel = getattr(callback, "check_cancel", None)
    if check_cancel is not None:
        check_cancel()


def is_interactive(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal (a bar can be redrawn in place)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def format_seconds(seconds: float) -> str:
    """``42s`` or ``3m05s``."""
    whole = max(0, int(round(seconds)))
    if whole < SECONDS_PER_MINUTE:
        return f"{whole}s"
    minutes, rest = divmod(whole, SECONDS_PER_MINUTE)
    return f"{minutes}m{rest:02d}s"


def bar_line(label: str, step: int, total: int, elapsed: float, width: int = BAR_WIDTH) -> str:
    """``label [#####.....] 12/40 3s, ~9s left`` (the remaining time once a step is done)."""
    fraction = min(1.0, max(0.0, step / total)) if total > 0 else 1.0
    filled = int(fraction * width)
    timing = format_seconds(elapsed)
    if 0 < step < total:
        timing += f", ~{format_seconds(elapsed / step * (total - step))} left"
    return f"{label} [{BAR_FILLED * filled}{BAR_EMPTY * (width - filled)}] {step}/{total} {timing}"


def plain_line(label: str, step: int, total: int, elapsed: float) -> str:
    """``label: 12/40 (3s)``."""
    return f"{label}: {step}/{total} ({format_seconds(elapsed)})"


def quarter(step: int, total: int) -> int:
    """Which of the ``PLAIN_REPORTS_PER_PHASE`` parts of a phase ``step`` completes (0 before the first)."""
    if total <= 0:
        return PLAIN_REPORTS_PER_PHASE
    return min(step, total) * PLAIN_REPORTS_PER_PHASE // total


class ProgressReporter:
    """Writes progress of successive phases to ``stream`` (default ``sys.stderr``).

    ``interactive`` forces the bar (True) or the plain lines (False); by default the bar is drawn when the
    stream is a terminal. With ``quiet`` nothing is ever written. ``clock`` exists for tests.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.interactive = is_interactive(self.stream) if interactive is None else interactive
        self.clock = clock
        self._open: _Phase | None = None

    def message(self, text: str) -> None:
        """One line of text, after ending any bar still on screen."""
        self.finish()
        self._write(text + "\n")

    def phase(self, label: str) -> Callback:
        """Start a phase named ``label``; returns its ``callback(step, total, preview)``."""
        self.finish()
        current = _Phase(label, self.clock())
        self._open = current

        def callback(step: int, total: int, preview: object = None) -> None:
            if self._open is current:
                self._update(current, int(step), int(total))

        return callback

    def finish(self) -> None:
        """End the current phase (its bar line, or its last plain line when it stopped early)."""
        current, self._open = self._open, None
        if current is None or current.step is None:
            return
        if self.interactive and not current.ended:
            self._write("\n")
        elif not self.interactive and current.reported < current.step:
            self._write(plain_line(current.label, current.step, current.total, current.elapsed) + "\n")

    def _update(self, current: "_Phase", step: int, total: int) -> None:
        current.step, current.total, current.elapsed = step, total, self.clock() - current.start
        if self.interactive:
            if current.ended:
                return
            line = bar_line(current.label, step, total, current.elapsed)
            padding = " " * max(0, current.width - len(line))  # wipe what a longer line left behind
            current.width = len(line)
            current.ended = step >= total
            self._write("\r" + line + padding + ("\n" if current.ended else ""))
        elif quarter(step, total) > quarter(current.reported, total):
            current.reported = step
            self._write(plain_line(current.label, step, total, current.elapsed) + "\n")

    def _write(self, text: str) -> None:
        if self.quiet:
            return
        self.stream.write(text)
        self.stream.flush()


class _Phase:
    """What a reporter remembers of the phase in progress."""

    def __init__(self, label: str, start: float) -> None:
        self.label, self.start = label, start
        self.step: int | None = None
        self.total = 0
        self.elapsed = 0.0
        self.reported = 0  # last step written as a plain line
        self.width = 0  # length of the bar line on screen
        self.ended = False
