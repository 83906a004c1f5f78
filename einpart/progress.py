"""Progress and feedback for long steps: shown on a terminal, silent when piped.

Solving the ILP, XLA compilation, weight loading and generation can take
seconds to minutes; a user at a terminal should see what is happening, while
a script piping einpart's output must get only the results. So one
`Progress` decides, from its stream (stderr by default): it reports only when
the stream is a terminal (`isatty()`), or when asked explicitly. `-v` is a
separate switch: it prints per-pass timings (and the steps' times) whether
or not the stream is a terminal, since the user asked for them.

    from einpart import progress
    with progress.current().step("compiling prefill (XLA)"):
        ...                                 # "compiling prefill (XLA) ..." then "... 1.2 s"
    progress.current().count("generating", i, n)   # "generating 3/8", rewritten in place

The CLI calls `configure(verbose=args.verbose)` once; the runtime and the
library API call `current()`. Passes never print (they stay pure); the
pipeline's per-pass times come back in its records and `timings()` prints them.
Only this module writes progress text, so "quiet when piped" holds everywhere.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO


class Progress:
    """Progress lines on `stream` (default: sys.stderr at the time of writing).

    enabled: None = only if the stream is a terminal; True / False forces it.
    verbose: also print timings (pass by pass) even when the stream is not a terminal.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, verbose: bool = False):
        self._stream = stream
        self._enabled = enabled
        self.verbose = verbose
        self._open_count = False    # a counter line is being rewritten in place

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def enabled(self) -> bool:
        """Whether progress lines are shown: forced, or the stream is a terminal."""
        if self._enabled is not None:
            return self._enabled
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except (ValueError, OSError):       # a closed stream
            return False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):       # a closed or broken stream: progress is never fatal
            pass

    def _end_count(self) -> None:
        if self._open_count:
            self._write("\n")
            self._open_count = False

    def note(self, text: str) -> None:
        """One line of progress (terminal only)."""
        if self.enabled:
            self._end_count()
            self._write(f"einpart: {text}\n")

    @contextlib.contextmanager
    def step(self, what: str):
        """A long step: announced before, timed after (on a terminal, or with verbose)."""
        show = self.enabled
        if show:
            self._end_count()
            self._write(f"einpart: {what} ...\n")
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            if show or self.verbose:
                self._end_count()
                self._write(f"einpart: {what}: {_seconds(seconds)}\n")

    def count(self, what: str, done: int, total: int) -> None:
        """A counter rewritten in place on a terminal ("generating 3/8"); a newline when done."""
        if not self.enabled:
            return
        self._write(f"\reinpart: {what} {done}/{total}")
        self._open_count = done < total
        if done >= total:
            self._write("\n")

    def timings(self, records, title: str = "passes") -> None:
        """Per-pass times of a pipeline run (its PassRecords), with verbose only."""
        if not self.verbose:
            return
        self._end_count()
        for rec in records:
            if rec.name == "input":
                continue
            self._write(f"einpart: pass {rec.name}: {_seconds(rec.seconds)}\n")


def _seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


_CURRENT = Progress()


def current() -> Progress:
    """The process's progress reporter (stderr; shown on a terminal)."""
    return _CURRENT


def configure(stream: TextIO | None = None, enabled: bool | None = None, verbose: bool = False) -> Progress:
    """Replace the process's reporter (the CLI does this once from its flags); returns it."""
    global _CURRENT
    _CURRENT = Progress(stream, enabled, verbose)
    return _CURRENT


__all__ = ["Progress", "configure", "current"]
