"""The project's error types. Every error a user can cause is an EinpartError;
the CLI prints its message and exits 1, so no traceback reaches a user."""
from __future__ import annotations


class EinpartError(Exception):
    """A user-facing error: str(e) is the whole message."""


class SpecError(EinpartError):
    """An error in a spec, pointing at FILE:LINE:COL with the source line and a caret."""

    def __init__(self, message: str, span=None, text: str = ""):
        self.message = message
        self.span = span
        self.text = text
        super().__init__(self.render())

    def render(self) -> str:
        span = self.span
        if span is None or span.line <= 0:
            where = span.file if span is not None else "<spec>"
            return f"{where}: error: {self.message}"
        head = f"{span.file}:{span.line}:{span.col}: error: {self.message}"
        lines = self.text.splitlines()
        if not (1 <= span.line <= len(lines)):
            return head
        src = lines[span.line - 1]
        width = 1
        if span.end_line == span.line and span.end_col > span.col:
            width = span.end_col - span.col
        caret = " " * (span.col - 1) + "^" + "~" * (width - 1)
        return f"{head}\n  {src}\n  {caret}"


class PassError(EinpartError):
    """A pass failed; names the pass and the passes that ran before it."""


class PlanError(EinpartError):
    """No plan exists (e.g. too little memory); the message carries the numbers."""
