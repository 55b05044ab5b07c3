"""Metrics: the installed service's /metrics answers Prometheus text with the key and 401 without it,
and the Grafana dashboard and scrape config shipped in examples/monitoring/ ask for what it serves."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
MON = ROOT / "examples" / "monitoring"
SCRAPE = ("import sys, urllib.request as u, urllib.error\n"
          "r = u.Request('http://127.0.0.1:18140/metrics', headers={'Authorization': 'Bearer ' + sys.argv[1]} "
          "if sys.argv[1] else {})\n"
          "try:\n    print(u.urlopen(r, timeout=30).read().decode())\n"
          "except urllib.error.HTTPError as e:\n    print('HTTP', e.code)\n")


def _series(text: str) -> dict[str, float]:
    """name → value of each sample line of Prometheus' text format (labels dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", line).groups()
            out[name] = float(value)
    return out


def test_the_dashboard_is_grafana_json_and_the_scrape_config_sends_the_key():
    d = json.loads((MON / "grafana-dashboard.json").read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "job"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) >= 4
    for p in d["panels"]:
        assert p["type"] == "timeseries" and p["title"] and set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for what in ("tokens per second", "running and waiting", "time to first token", "kv cache"):
        assert what in titles
    job = yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"]


def test_the_installed_service_is_scraped_with_its_key_and_serves_what_the_dashboard_asks(bundle_dir, netns,
                                                                                          tmp_path):
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18140", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    key = next(line.split("=", 1)[1].strip() for line in open(out["api_key_file"]) if line.startswith("LLAMA_API_KEY="))
    try:
        assert netns.run([sys.executable, "-c", SCRAPE, ""]).stdout.strip() == "HTTP 401"
        text = netns.run([sys.executable, "-c", SCRAPE, key]).stdout
        got = _series(text)
        # the install's smoke test asked the model: its tokens are counted
        assert got["llamacpp:tokens_predicted_total"] > 0 and got["llamacpp:prompt_tokens_total"] > 0
        dash = (MON / "grafana-dashboard.json").read_text()
        asked = set(re.findall(r"llamacpp:[a-z_]+", dash))
        assert asked and asked <= set(got), sorted(asked - set(got))
    finally:
        subprocess.run([out["ctl"], "stop"], capture_output=True)
