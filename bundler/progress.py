"""Progress for anything that takes more than a few seconds: a tqdm bar on a terminal; off one (a log
file, journald, CI) one line when the work starts and one when it ends, so no carriage returns and
redrawn bars land in logs. Every progress display of the project goes through `bar`."""

from __future__ import annotations

import sys
import time
from typing import Any


class _Lines:
    """tqdm's surface the project uses (update, close, a context manager), as two lines."""

    def __init__(self, total: Any = None, desc: str = "", unit: str = "it", unit_scale: bool = False,
                 initial: int = 0, disable: bool = False, **_: Any) -> None:
        self.total, self.desc, self.unit, self.scale, self.n = total, desc, unit, unit_scale, initial
        self.disable, self.closed, self.t0 = disable, False, time.monotonic()
        if not disable:
            print(f"{desc}: started" + (f" ({self._amount(total)})" if total else ""), file=sys.stderr, flush=True)

    def _amount(self, n: float) -> str:
        if self.scale and self.unit == "B":
            for u in ("B", "KiB", "MiB", "GiB", "TiB"):
                if n < 1024 or u == "TiB":
                    return f"{n:.1f} {u}" if u != "B" else f"{int(n)} B"
                n /= 1024
        return f"{int(n)} {self.unit}"

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.closed or self.disable:
            self.closed = True
            return
        self.closed = True
        done = f"{self._amount(self.n)} " if self.n else ""
        print(f"{self.desc}: done, {done}in {time.monotonic() - self.t0:.1f}s", file=sys.stderr, flush=True)

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(**kw: Any) -> Any:
    """tqdm(**kw) on standard error when it is a terminal, else a line at the start and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(file=sys.stderr, **kw)
    return _Lines(**kw)
