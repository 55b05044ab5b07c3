"""Starts TabbyAPI (ExLlama's server, either generation) for a release:
`python -m bundler.engines.tabby_run TABBY_DIR CONFIG`.

TabbyAPI reads config.yml and api_tokens.yml from its working directory, writes api_tokens.yml
there, and loads sampler presets and templates from it. So each start gets its own private folder
under the service's cache (RUN_DIR, mode 0700): the tree's folders linked in, config.yml from the
release's plan, api_tokens.yml (0600) with the service's key as api_key and a fresh random
admin_key that nobody is told (admin routes load, unload and download models), and models/NAME
linking the stored model so TabbyAPI reports the model by the name clients use.

Two more guards around TabbyAPI's own auth: TabbyAPI logs both keys at start, so its auth module's
logger is given the keys masked; and the same middleware as vLLM's puts every route but /health
behind the key (TabbyAPI leaves /docs and /openapi.json open). Standard library only until
TabbyAPI itself is imported.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

KEEP_OUT = ("config.yml", "api_tokens.yml", "models")


def prepare(tabby_dir: Path, config: dict, key: str, base: Path) -> Path:
    """The private working folder of this start (made afresh); returns it."""
    port = int(config["network"]["port"])
    base.mkdir(parents=True, exist_ok=True)
    run = base / f"tabbyapi-{port}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(mode=0o700)
    os.chmod(run, 0o700)
    for entry in tabby_dir.iterdir():
        if entry.name not in KEEP_OUT:
            (run / entry.name).symlink_to(entry)
    conf = json.loads(json.dumps(config))
    ours = conf.pop("airgap_llm", {})
    (run / "models").mkdir()
    if conf["model"].get("model_name"):  # none: TabbyAPI starts without a model (loaded later by an admin)
        (run / "models" / conf["model"]["model_name"]).symlink_to(ours["model_path"])
    conf["model"]["model_dir"] = str(run / "models")
    (run / "config.yml").write_text(json.dumps(conf, indent=2) + "\n")  # JSON is YAML
    fd = os.open(run / "api_tokens.yml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"api_key": key, "admin_key": secrets.token_hex(32)}) + "\n")
    return run


class _Masked:
    """A logger whose messages have the given secrets masked (TabbyAPI's auth logs both keys)."""

    def __init__(self, inner, secret_values):
        self._inner = inner
        self._secrets = [s for s in secret_values if s]

    def _mask(self, value):
        if isinstance(value, str):
            for s in self._secrets:
                value = value.replace(s, "****")
        return value

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return attr(*(self._mask(a) for a in args), **kwargs)

        return call


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tabby_dir, config_file = Path(args[0]).resolve(), Path(args[1])
    key = os.environ.get("VLLM_API_KEY") or os.environ.get("LLAMA_API_KEY") or ""
    if not key:
        print("tabby_run: no API key in the environment (VLLM_API_KEY); refusing to serve without one",
              file=sys.stderr)
        return 2
    # the release's launch names the service's own cache; by hand, a fresh private folder (never a
    # predictable name in /tmp, which another account could have made first)
    where = os.environ.get("AIRGAP_LLM_RUN_DIR") or os.environ.get("CACHE_DIRECTORY")
    import tempfile

    base = Path(where) if where else Path(tempfile.mkdtemp(prefix="airgap-tabbyapi-"))
    config = json.loads(config_file.read_text())
    run = prepare(tabby_dir, config, key, base)
    if config.get("memory", {}).get("cuda_malloc_async", True):
        # TabbyAPI sets torch's allocator (its memory.cuda_malloc_async, on by default) before it imports
        # torch; the guards below import torch first, so it is set here, as TabbyAPI would
        for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
            os.environ.setdefault(var, "backend:cudaMallocAsync")
    tokens = json.loads((run / "api_tokens.yml").read_text())
    os.chdir(run)
    sys.path.insert(0, str(tabby_dir))
    sys.argv = [str(tabby_dir / "main.py")]

    import common.auth as auth  # TabbyAPI's

    auth.logger = _Masked(auth.logger, tokens.values())
    import endpoints.server as server  # TabbyAPI's

    from .vllm_auth import KeyOnEveryRoute

    setup_app = server.setup_app

    def guarded(*a, **kw):
        app = setup_app(*a, **kw)
        app.add_middleware(KeyOnEveryRoute, key=key)
        return app

    server.setup_app = guarded
    import runpy

    runpy.run_path(str(tabby_dir / "main.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
