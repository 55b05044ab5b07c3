#!/usr/bin/env python3
"""Serve model directories as Hugging Face (and ModelScope) repositories from the test hub
(tests/fakehub.py), in the foreground, to bundle them with hf:// sources on a machine that
cannot reach the hub: the connected side of the GPU-box runs (docs/device/gpu-box-hub.toml).

usage: fakehub_serve.py ORG/REPO=DIR [ORG/REPO=DIR …]   (prints HF_ENDPOINT=URL, then serves)
"""

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakehub import Hub, Repo  # noqa: E402


def main() -> None:
    repos = {}
    for arg in sys.argv[1:]:
        name, _, path = arg.partition("=")
        commit = hashlib.sha1(f"{name} {path}".encode()).hexdigest()  # stable: the lock stays valid
        repos[name] = Repo.from_dir(Path(path), commit)
    hub = Hub(repos=repos).start()
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
