"""What the box side asks of an engine, as data: core and box code read these capabilities and never
compare engine names for them. Each engine package defines its own (ENGINE, or one per generation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    name: str  # in plans, manifests and the spec
    label: str  # for people
    formats: tuple[str, ...]  # model formats it serves
    triton: bool = False  # its kernels are Triton's: they compile a C launcher at first use (a C compiler, headers)
    slow_start: bool = False  # compiles kernels or loads layer by layer at its first start: 900 s to be healthy
    fatal_log: tuple[str, ...] = ()  # log lines after which it never becomes healthy (seen at once, not at timeout)
    guarded: tuple[tuple[str, str], ...] = ()  # routes that must refuse a request without the key (smoke test)
    serial_start: bool = False  # sizes its cache from the memory it sees used while starting: start it alone
    tp_retry: bool = False  # a crashed tensor-parallel start is retried once with the safe all-reduce flags
    reference: str = ""  # how a user starts it by hand: --tune's and --baseline's reference
