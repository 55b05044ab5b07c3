"""Plain HTTP(S) downloads: resume with Range after a cut-off, progress bar,
`.incomplete` file moved into place only when whole and its sha256 matches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import BundlerError
from ..spec import ModelSpec
from . import cached_path, check_and_place

CHUNK = 64 << 10  # small blocks: a cut-off loses at most this much


def download(url: str, tmp: Path, *, headers: dict[str, str] | None = None, label: str = "",
             timeout: float = 30.0, quiet: bool = False) -> None:
    """Download url into tmp, resuming from tmp's current size when the server allows it."""
    import requests
    from ..progress import bar as tqdm

    headers = dict(headers or {})
    have = tmp.stat().st_size if tmp.exists() else 0
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.RequestException as e:
        raise BundlerError(f"cannot download {url}: {e}", hint="check the address and the network; "
                           "run the same command again to resume")
    with resp:
        if resp.status_code == 416 and have:  # we already have every byte
            return
        if resp.status_code not in (200, 206):
            raise BundlerError(f"cannot download {url}: HTTP {resp.status_code}",
                               hint="check the address (and a token for private repositories)")
        if have and resp.status_code == 200:
            have = 0  # the server ignored Range: start over
        total = resp.headers.get("Content-Length")
        total_i = int(total) + have if total is not None else None
        mode = "ab" if have else "wb"
        with open(tmp, mode) as f, tqdm(total=total_i, initial=have, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=label or tmp.name, disable=quiet,
                                        mininterval=0.3) as bar:
            try:
                for block in resp.iter_content(CHUNK):
                    f.write(block)
                    bar.update(len(block))
            except requests.RequestException as e:
                raise BundlerError(f"download of {url} broke off after {f.tell()} bytes: {e}",
                                   hint="run the same command again: it resumes where it stopped")
        if total_i is not None and tmp.stat().st_size < total_i:
            raise BundlerError(f"download of {url} broke off at {tmp.stat().st_size} of {total_i} bytes",
                               hint="run the same command again: it resumes where it stopped")


def partial_path(model: ModelSpec) -> Path:
    """A name unique to this model's pin, so a resume never mixes two sources."""
    tag = hashlib.sha256(model.source.encode()).hexdigest()[:8]
    dest = cached_path(model)
    return dest.with_name(f"{dest.name}.{tag}.incomplete")


def fetch(model: ModelSpec, log=print, *, headers: dict[str, str] | None = None, url: str | None = None) -> Path:
    url = url or model.source
    tmp = partial_path(model)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        log(f"model {model.file}: resuming download at {tmp.stat().st_size} bytes")
    else:
        log(f"model {model.file}: downloading {url}")
    download(url, tmp, headers=headers, label=model.file, quiet=os.environ.get("AIRGAP_LLM_QUIET") == "1")
    return check_and_place(tmp, model, url)
