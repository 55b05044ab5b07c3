"""Messages to the operator: progress and warnings on stderr (stdout is for --json)."""

from __future__ import annotations

import sys


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def shout(msg: str) -> None:
    bar = "!" * min(100, len(msg) + 4)
    print(f"{bar}\n! {msg}\n{bar}", file=sys.stderr, flush=True)


def ask(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")
