"""A served engine asked for 512 tokens, streamed and not, twice each (device runs: tools/device_accept.sh).
usage: stream_vs_not.py ENV_FILE BASE_URL MODEL"""

import json
import sys
import time
import urllib.request as u

from route_sweep import env_key


def go(base: str, model: str, key: str, stream: bool) -> tuple[float, int]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 512, "ignore_eos": True, "stream": stream,
            "temperature": 0}
    r = u.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    t0, n = time.monotonic(), 0
    with u.urlopen(r, timeout=120) as resp:
        if stream:
            for line in resp:
                n += line.startswith(b"data: {")
        else:
            d = json.loads(resp.read())
            n = (d.get("usage") or {}).get("completion_tokens") or len(d["choices"][0]["text"])
    return time.monotonic() - t0, n


def main() -> None:
    envf, base, model = sys.argv[1], sys.argv[2], sys.argv[3]
    key = env_key(envf)
    for s in (False, True, False, True):
        t, n = go(base, model, key, s)
        print(f"stream={s}: {n} {'chunks' if s else 'tokens (or chars)'} in {t:.2f}s")


if __name__ == "__main__":
    main()
