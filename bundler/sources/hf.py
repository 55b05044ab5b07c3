"""Hugging Face hub (and mirrors through HF_ENDPOINT): hf://ORG/REPO/PATH@REVISION.

The URL and token come from huggingface_hub (so HF_ENDPOINT and HF_TOKEN work as
users expect); the bytes come through our resumable downloader, which hashes
every byte (hf_hub_download only checks sizes).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..spec import ModelSpec
from . import url as url_source


def parse(source: str) -> tuple[str, str, str]:
    rest, _, revision = source[len("hf://"):].rpartition("@")
    org, repo, path = rest.split("/", 2)
    return f"{org}/{repo}", path, revision


def fetch(model: ModelSpec, log=print) -> Path:
    from huggingface_hub import hf_hub_url

    repo_id, path, revision = parse(model.source)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return url_source.fetch(model, log=log, headers=headers, url=url)
