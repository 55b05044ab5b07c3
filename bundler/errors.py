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


def unexpected(e: BaseException, what: str) -> int:
    """The last line of defence of an entry point: no traceback reaches a user. The traceback goes to a
    log file, the user gets one line naming the error and where the log is; exit 1."""
    import os
    import sys
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"airgap-llm-{what}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(" ".join(sys.argv) + "\n\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    if isinstance(e, OSError) and e.filename:
        msg = f"{e.filename}: {e.strerror or e}"
        hint = "check that path (a file where a folder belongs, no room left, a read-only file system, permissions)"
    else:
        msg = f"{type(e).__name__}: {e}"
        hint = "this is a bug in airgap-llm"
    print(f"error: {msg}", file=sys.stderr)
    print(f"hint: {hint}; the full report is in {path}", file=sys.stderr)
    return 1
