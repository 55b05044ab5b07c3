"""Every route a served OpenAI-compatible engine lists in its /openapi.json, asked without the key (device runs:
tools/device_accept.sh). usage: route_sweep.py ENV_FILE BASE_URL OUT.json"""
import json, sys, urllib.error, urllib.request as u
envf, base, out = sys.argv[1], sys.argv[2], sys.argv[3]
env = dict(l.split("=", 1) for l in open(envf).read().splitlines() if "=" in l)
key = next(v for k, v in env.items() if k.endswith("API_KEY"))
def call(method, path, k=None):
    r = u.Request(base + path, data=b"{}" if method in ("POST", "PUT", "PATCH", "DELETE") else None, method=method,
                  headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {k}"} if k else {})})
    try:
        with u.urlopen(r, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
code, spec = call("GET", "/openapi.json", key)
if code != 200:
    print("openapi.json with the key:", code); sys.exit(1)
routes = sorted((m.upper(), p) for p, ms in json.loads(spec)["paths"].items() for m in ms if "{" not in p)
seen = {f"{m} {p}": call(m, p)[0] for m, p in routes}
json.dump(seen, open(out, "w"), indent=1)
bad = [r for r, c in seen.items() if c != 401 and not r.endswith(" /health")]
print(f"{len(seen)} routes; answered without the key: {bad or 'none'}; openapi.json without the key: {call('GET', '/openapi.json')[0]}")
