"""The one error type users see. The CLI prints `error:` and `hint:` lines and exits 1."""

from __future__ import annotations


class BundlerError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class SpecError(BundlerError):
    """The bundle spec is invalid; the message names the file and key."""


class VerifyError(BundlerError):
    """A file does not match the manifest."""


class PlanRefused(BundlerError):
    """No engine can serve the model on this hardware."""

    exit_code = 3


def report(e: BundlerError) -> int:
    """Print `error:` and `hint:` to stderr; return the exit code (the CLIs' one place for this)."""
    import sys

    print(f"error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"hint: {e.hint}", file=sys.stderr)
    return e.exit_code
