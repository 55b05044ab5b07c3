"""Whole model repositories: hf://ORG/REPO@REVISION and modelscope://ORG/REPO@REVISION.

resolve() asks the hub which commit the revision (a branch, tag or commit) is and which files
it holds, with each file's size and, for LFS files, the hub's own sha256: that is the lock
`make bundle` writes beside the spec (like pip-compile) and reuses until the spec's source
changes or `--upgrade-models` is given. fetch_files() then brings every file through the
resumable downloader, checking each byte against the locked sha256 (a small non-LFS file, which
the hub gives no sha256 for, is hashed after its first download and the lock records it), into
a cache shared by content: the second bundle of the same repo downloads nothing.

Hugging Face through huggingface_hub's HfApi (HF_ENDPOINT and HF_TOKEN work as users expect);
ModelScope through its HTTP API (MODELSCOPE_ENDPOINT overrides the endpoint, MODELSCOPE_API_TOKEN
is sent when set).
"""

from __future__ import annotations

import fnmatch
import json
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cache_root
from ..errors import BundlerError
from ..files import atomic_write
from ..manifest import sha256_file
from . import url as url_source

SCHEMES = ("hf://", "modelscope://")
MODELSCOPE_DEFAULT = "https://www.modelscope.cn"


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    sha256: str  # "" until a non-LFS file was hashed once


@dataclass(frozen=True)
class Resolved:
    source: str
    commit: str
    files: tuple[RepoFile, ...]


def is_repo(source: str) -> bool:
    """A whole repository: hf://ORG/REPO@REV or modelscope://ORG/REPO@REV (no file path)."""
    if not source.startswith(SCHEMES):
        return False
    rest = source.split("://", 1)[1].rsplit("@", 1)[0]
    return rest.count("/") == 1


def parse(source: str) -> tuple[str, str, str]:
    """(scheme, ORG/REPO, revision)."""
    scheme, rest = source.split("://", 1)
    repo, _, revision = rest.rpartition("@")
    return scheme, repo, revision


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatch(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatch(path, g) for g in exclude)


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _ms_endpoint() -> str:
    return (os.environ.get("MODELSCOPE_ENDPOINT") or MODELSCOPE_DEFAULT).rstrip("/")


def _headers(scheme: str) -> dict[str, str]:
    token = os.environ.get("HF_TOKEN" if scheme == "hf" else "MODELSCOPE_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve(source: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Resolved:
    scheme, repo, revision = parse(source)
    try:
        commit, files = (_resolve_hf if scheme == "hf" else _resolve_ms)(repo, revision)
    except BundlerError:
        raise
    except Exception as e:  # the hub clients raise their own errors for 404, 401, no network
        raise BundlerError(f"{source}: cannot list the repository ({type(e).__name__}: {str(e)[:300]})",
                           hint="check the repo and revision, the endpoint (HF_ENDPOINT / MODELSCOPE_ENDPOINT) "
                                "and the token for a private repo (HF_TOKEN / MODELSCOPE_API_TOKEN)")
    chosen = tuple(f for f in files if _selected(f.path, include, exclude))
    if not chosen:
        raise BundlerError(f"{source}: no file of the {len(files)} in the repository matches include={list(include)} "
                           f"exclude={list(exclude)}", hint="fix models.include / models.exclude in the spec")
    return Resolved(source=source, commit=commit, files=chosen)


def _resolve_hf(repo: str, revision: str) -> tuple[str, list[RepoFile]]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_hf_endpoint(), token=os.environ.get("HF_TOKEN") or None).model_info(
        repo, revision=revision, files_metadata=True)
    files = []
    for s in info.siblings or []:
        sha = s.lfs.sha256 if s.lfs else ""
        size = s.lfs.size if s.lfs else (s.size or 0)
        files.append(RepoFile(path=s.rfilename, size=int(size), sha256=sha or ""))
    if not info.sha:
        raise BundlerError(f"hf://{repo}@{revision}: the hub named no commit for this revision",
                           hint="pin a commit hash as the revision")
    return info.sha, files


def _ms_get(url: str) -> Any:
    req = urllib.request.Request(url, headers=_headers("modelscope"))
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _resolve_ms(repo: str, revision: str) -> tuple[str, list[RepoFile]]:
    """ModelScope's HTTP API: the revision's commit, then its file tree with sizes and sha256."""
    base = f"{_ms_endpoint()}/api/v1/models/{repo}"
    q = urllib.parse.urlencode({"Revision": revision})
    commit = revision
    try:
        revs = _ms_get(f"{base}/revisions?{q}")
        for group in ("Branches", "Tags"):
            for r in (revs.get("Data") or {}).get("RevisionMap", {}).get(group) or []:
                if r.get("Revision") == revision and r.get("CommitId"):
                    commit = r["CommitId"]
    except OSError:
        pass  # an older endpoint without /revisions: the revision as given is what gets pinned
    tree = _ms_get(f"{base}/repo/files?{urllib.parse.urlencode({'Revision': commit, 'Recursive': 'true'})}")
    files = [RepoFile(path=f["Path"], size=int(f.get("Size") or 0), sha256=(f.get("Sha256") or "").lower())
             for f in (tree.get("Data") or {}).get("Files") or [] if f.get("Type", "blob") == "blob"]
    return commit, files


def file_url(source: str, commit: str, path: str) -> str:
    scheme, repo, _ = parse(source)
    if scheme == "hf":
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo, path, revision=commit, endpoint=_hf_endpoint())
    q = urllib.parse.urlencode({"Revision": commit, "FilePath": path})
    return f"{_ms_endpoint()}/api/v1/models/{repo}/repo?{q}"


# ---- the lock beside the spec -----------------------------------------------------------

def lock_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.stem + ".models.lock")


def read_lock(spec_path: Path) -> dict[str, Any]:
    try:
        return json.loads(lock_path(spec_path).read_text())
    except FileNotFoundError:
        return {"version": 1, "models": {}}
    except ValueError as e:
        raise BundlerError(f"{lock_path(spec_path)}: not valid JSON ({e})",
                           hint="delete it and run make bundle again to resolve the repositories anew")


def write_lock(spec_path: Path, lock: dict[str, Any]) -> None:
    atomic_write(lock_path(spec_path), (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode())


def locked(lock: dict[str, Any], name: str, source: str, include: tuple[str, ...],
           exclude: tuple[str, ...]) -> Resolved | None:
    """What the lock holds for this model, if it was resolved from the same inputs."""
    e = lock.get("models", {}).get(name)
    if not e or e.get("source") != source or e.get("include", []) != list(include) or \
            e.get("exclude", []) != list(exclude):
        return None
    return Resolved(source=source, commit=e["commit"],
                    files=tuple(RepoFile(f["path"], int(f["size"]), f.get("sha256", "")) for f in e["files"]))


def record(lock: dict[str, Any], name: str, r: Resolved, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    lock.setdefault("models", {})[name] = {
        "source": r.source, "commit": r.commit, "include": list(include), "exclude": list(exclude),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in r.files]}


# ---- bytes ----------------------------------------------------------------------------------

def blob_cache() -> Path:
    return cache_root() / "blobs"


def _download(url: str, tmp: Path, headers: dict[str, str], label: str, log, tries: int = 4) -> None:
    """The resumable download, resumed up to `tries` times when the connection breaks off."""
    for attempt in range(1, tries + 1):
        try:
            return url_source.download(url, tmp, headers=headers, label=label, quiet=True)
        except BundlerError as e:
            if "broke off" not in e.message or attempt == tries:
                raise
            log(f"{label}: {e.message}; resuming at {tmp.stat().st_size if tmp.exists() else 0} bytes")


def fetch_files(r: Resolved, log=print) -> tuple[Resolved, dict[str, Path]]:
    """Every file of `r` as a verified local copy (path in the repo → cached blob). Returns the
    resolution with the sha256 of files the hub gave none for filled in."""
    from ..progress import bar as tqdm

    scheme = parse(r.source)[0]
    out: dict[str, Path] = {}
    done: list[RepoFile] = []
    todo = [f for f in r.files if not (f.sha256 and (blob_cache() / f.sha256).is_file())]
    total = sum(f.size for f in todo)
    if todo:
        log(f"{r.source}: downloading {len(todo)} of {len(r.files)} files ({total / 2**20:.1f} MiB; the rest are "
            "cached)")
    else:
        log(f"{r.source}: all {len(r.files)} files cached")
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="repo files", disable=not todo,
               mininterval=0.5)
    try:
        for f in r.files:
            blob = blob_cache() / f.sha256 if f.sha256 else None
            if blob is not None and blob.is_file():
                out[f.path] = blob
                done.append(f)
                continue
            tmp = blob_cache() / ".incoming" / f"{parse(r.source)[1].replace('/', '--')}--{r.commit[:12]}--" \
                f"{f.path.replace('/', '--')}.incomplete"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            before = tmp.stat().st_size if tmp.exists() else 0
            _download(file_url(r.source, r.commit, f.path), tmp, _headers(scheme), f.path, log)
            bar.update(max(0, tmp.stat().st_size - before))
            got = tmp.stat().st_size
            if f.size and got != f.size:
                tmp.unlink()
                raise BundlerError(f"{r.source}: {f.path} arrived with {got} bytes, the hub listed {f.size}",
                                   hint="run make bundle again")
            digest = sha256_file(tmp)
            if f.sha256 and digest != f.sha256:
                tmp.unlink()
                raise BundlerError(f"{r.source}: {f.path}: sha256 mismatch: the hub's LFS record (and the lock) say "
                                   f"{f.sha256}, the bytes that came are {digest}; nothing of it was kept",
                                   hint="a damaged download or a changed repository: run make bundle again; if it "
                                        "persists, re-resolve with --upgrade-models")
            dest = blob_cache() / digest
            os.replace(tmp, dest)
            out[f.path] = dest
            done.append(RepoFile(f.path, f.size or dest.stat().st_size, digest))
    finally:
        bar.close()
    return Resolved(r.source, r.commit, tuple(done)), out
