"""Every route a served OpenAI-compatible engine lists in its /openapi.json, asked without the key (device runs:
tools/device_accept.sh). usage: route_sweep.py ENV_FILE BASE_URL OUT.json"""

import json
import sys
import urllib.error
import urllib.request as u


def env_key(path: str) -> str:
    """The API key of an installed service's env file (the *_API_KEY line)."""
    env = dict(line.split("=", 1) for line in open(path).read().splitlines() if "=" in line)
    return next(v for k, v in env.items() if k.endswith("API_KEY"))


def call(base: str, method: str, path: str, k: str | None = None) -> tuple[int, bytes]:
    r = u.Request(base + path, data=b"{}" if method in ("POST", "PUT", "PATCH", "DELETE") else None, method=method,
                  headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {k}"} if k else {})})
    try:
        with u.urlopen(r, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def main() -> int:
    envf, base, out = sys.argv[1], sys.argv[2], sys.argv[3]
    code, spec = call(base, "GET", "/openapi.json", env_key(envf))
    if code != 200:
        print("openapi.json with the key:", code)
        return 1
    routes = sorted((m.upper(), p) for p, ms in json.loads(spec)["paths"].items() for m in ms if "{" not in p)
    seen = {f"{m} {p}": call(base, m, p)[0] for m, p in routes}
    json.dump(seen, open(out, "w"), indent=1)
    bad = [r for r, c in seen.items() if c != 401 and not r.endswith(" /health")]
    print(f"{len(seen)} routes; answered without the key: {bad or 'none'}; "
          f"openapi.json without the key: {call(base, 'GET', '/openapi.json')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
