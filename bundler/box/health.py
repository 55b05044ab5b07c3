"""Step 7: wait until the engine is healthy (seeing a crashed start at once), then prove it
answers a chat request with the key and refuses one without it."""

from __future__ import annotations

import errno
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from .. import engines
from ..errors import BundlerError

# a connect that fails with these will fail the same way until someone fixes the network setup
UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)


def http_json(url: str, body: Any = None, key: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    # The box has no network and must never try: no proxy, loopback or the given host only; and no redirect,
    # which would carry the key to wherever the answer points
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None


class LogWatch:
    """New lines of the service's log since the start (the file, or journald for a unit),
    searched for lines after which the engine will never become healthy."""

    def __init__(self, patterns: tuple[str, ...], path: Path | None = None, unit: str = ""):
        self.patterns, self.path, self.unit = patterns, path, unit
        self.since = time.time()
        try:
            self.offset = path.stat().st_size if path else 0
        except FileNotFoundError:
            self.offset = 0

    def _new_text(self) -> str:
        if self.unit:
            return subprocess.run(["journalctl", "-u", self.unit, "-o", "cat", "--no-pager",
                                   f"--since=@{int(self.since)}"], capture_output=True, text=True).stdout
        try:
            with open(self.path, "rb") as f:  # type: ignore[arg-type]
                f.seek(self.offset)
                return f.read(8 << 20).decode("utf-8", "replace")
        except (FileNotFoundError, TypeError):
            return ""

    def fatal(self) -> str:
        if not self.patterns:
            return ""
        for line in self._new_text().splitlines():
            if any(p in line for p in self.patterns):
                return line.strip()[:300]
        return ""


def _reason(e: BaseException) -> int:
    r = getattr(e, "reason", e)
    return getattr(r, "errno", 0) or 0


def wait_healthy(base: str, timeout: float, log_hint: str, alive: Callable[[], bool],
                 watch: LogWatch | None = None) -> float:
    from ..progress import bar as tqdm

    t0 = time.monotonic()
    unreachable = 0
    with tqdm(total=None, desc="waiting for the engine to load", unit="s", bar_format="{desc}: {elapsed}",
              mininterval=0.5) as bar:
        while True:
            try:
                code, _ = http_json(base + "/health", timeout=2)
                if code == 200:
                    return time.monotonic() - t0
                unreachable = 0
            except (OSError, ValueError) as e:
                unreachable = unreachable + 1 if _reason(e) in UNREACHABLE else 0
            if unreachable >= 6:  # three seconds of "network unreachable": no engine will fix that
                raise BundlerError(f"{base} cannot be reached from this box (network unreachable: no route to the "
                                   "address the service listens on)",
                                   hint="bring loopback up (`ip link set lo up`) or pass a --host this box has")
            if not alive():
                raise BundlerError("the engine stopped while starting", hint=f"see its log: {log_hint}")
            line = watch.fatal() if watch else ""
            if line:
                raise BundlerError(f"the engine failed while starting: {line}", hint=f"see its log: {log_hint}")
            if time.monotonic() - t0 > timeout:
                raise BundlerError(f"the engine was not healthy after {timeout:.0f}s",
                                   hint=f"see its log: {log_hint}; a slow box may need --timeout")
            bar.update(0)
            time.sleep(0.5)




def open_routes(base: str, engine: str) -> list[str]:
    """The guarded routes that answered without the key with anything but 401."""
    found = []
    for method, path in engines.get(engine).guarded:  # each engine's own (engines/*/__init__.py)
        req = urllib.request.Request(base + path, data=b"{}" if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                code = resp.status
        except urllib.error.HTTPError as e:
            code = e.code
        if code != 401:
            found.append(f"{method} {path} → {code}")
    return found


# The smoke test asks what any working model of its kind answers the same way, so that noise (a
# wrong chat template, damaged weights, a model that never sees the prompt) fails the install.
CHAT_QUESTION = "What is the capital of France? Answer with one word."
CHAT_ANSWER = "paris"
COMPLETION_PROMPT = "Monday, Tuesday, Wednesday,"
COMPLETION_ANSWER = "thursday"


def _noise(what: str, asked: str, got: str, expected: str) -> BundlerError:
    return BundlerError(f"the service answers, but not sensibly: asked {asked!r} ({what}), the model said "
                        f"{got[:120]!r}, expected {expected!r} in it",
                        hint="a wrong chat template, damaged weights or the wrong model; if this model is not meant to "
                             "answer that (e.g. a test model with random weights), pass --smoke-any-answer")


def smoke(base: str, model: str, key: str, engine: str, expect: str = "chat") -> str:
    """Prove the service answers with the key, sensibly, and refuses without it. expect: "chat" (an
    instruction-tuned model: the chat answer must name Paris), "completion" (a base model, no chat
    template of its own: a plain completion must continue the weekdays; its chat answer need only
    be text), "any" (any text)."""
    question = CHAT_QUESTION if expect == "chat" else "Say hello in one short sentence."
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0}
    code, resp = http_json(base + "/v1/chat/completions", body, key=key, timeout=120)
    if code != 200:
        raise BundlerError(f"the chat smoke test got HTTP {code}: {resp}", hint="see the engine's log")
    msg = (resp or {}).get("choices", [{}])[0].get("message", {})
    text = msg.get("content") or msg.get("reasoning_content") or ""
    if not text.strip():
        raise BundlerError("the chat smoke test got an empty answer", hint="see the engine's log")
    if expect == "chat" and CHAT_ANSWER not in text.lower():
        raise _noise("chat", question, text, "Paris")
    if expect == "completion":
        body = {"model": model, "prompt": COMPLETION_PROMPT, "max_tokens": 6, "temperature": 0}
        code, resp = http_json(base + "/v1/completions", body, key=key, timeout=120)
        if code != 200:
            raise BundlerError(f"the completion smoke test got HTTP {code}: {resp}", hint="see the engine's log")
        done = (resp or {}).get("choices", [{}])[0].get("text") or ""
        if COMPLETION_ANSWER not in done.lower():
            raise _noise("a plain completion: this model has no chat template, so it is taken for a base model",
                         COMPLETION_PROMPT, done, "Thursday")
        text = f"{COMPLETION_PROMPT}{done}"
    unguarded = open_routes(base, engine)
    if unguarded:
        raise BundlerError(f"requests without the API key were answered: {', '.join(unguarded)}",
                           hint="the service is not protected by its key; see the env file")
    return text.strip()


# The embedding smoke test: two sentences that mean the same must lie closer than an unrelated one.
EMBED_SAME = ("The capital of France is Paris.", "Paris is the capital city of France.")
EMBED_OTHER = "Bananas are a good source of potassium."


def _cosine(a: list[float], b: list[float]) -> float:
    import math

    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0


def smoke_embed(base: str, model: str, key: str, engine: str, any_answer: bool = False) -> str:
    """Prove an embedding model answers /v1/embeddings with the key, sensibly (finite vectors of one
    size, and unless any_answer, the two sentences that mean the same closer than the third), and
    refuses without it."""
    import math

    texts = [*EMBED_SAME, EMBED_OTHER]
    code, resp = http_json(base + "/v1/embeddings", {"model": model, "input": texts}, key=key, timeout=120)
    if code != 200:
        raise BundlerError(f"the embedding smoke test got HTTP {code}: {resp}", hint="see the engine's log")
    rows = sorted((resp or {}).get("data") or [], key=lambda d: d.get("index", 0))
    vecs = [d.get("embedding") or [] for d in rows]
    dims = {len(v) for v in vecs}
    if len(vecs) != 3 or len(dims) != 1 or 0 in dims:
        raise BundlerError(f"the embedding smoke test got {len(vecs)} vectors of sizes {sorted(dims)} for 3 inputs",
                           hint="see the engine's log")
    if not all(math.isfinite(x) for v in vecs for x in v) or any(not any(v) for v in vecs):
        raise BundlerError("the embedding smoke test got vectors that are zero or not finite",
                           hint="damaged weights or the wrong pooling; see the engine's log")
    same, other = _cosine(vecs[0], vecs[1]), _cosine(vecs[0], vecs[2])
    if not any_answer and same <= other:
        raise BundlerError(f"the embedding model answers, but not sensibly: {EMBED_SAME[0]!r} is no closer to "
                           f"{EMBED_SAME[1]!r} (cosine {same:.3f}) than to {EMBED_OTHER!r} ({other:.3f})",
                           hint="the wrong model or pooling; for a test model with random weights pass "
                                "--smoke-any-answer")
    code, _ = http_json(base + "/v1/embeddings", {"model": model, "input": "x"}, timeout=30)
    unguarded = ([f"POST /v1/embeddings → {code}"] if code != 401 else []) + open_routes(base, engine)
    if unguarded:
        raise BundlerError(f"requests without the API key were answered: {', '.join(unguarded)}",
                           hint="the service is not protected by its key; see the env file")
    return f"{len(vecs[0])}-dimensional vectors; cosine {same:.2f} for the same meaning, {other:.2f} for another"
