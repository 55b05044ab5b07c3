"""The vulnerability report: every carried wheel looked up in an OSV-compatible database (here a local
server speaking its HTTP API: batch query, then each advisory), written into the bundle, applied by
the spec's policy and shown by install.sh --dry-run; an unreachable database is reported as such."""

import json
import subprocess
import sys

import pytest
from werkzeug import Request, Response

from bundler import spec, vulns
from bundler.errors import BundlerError
from tests.conftest import ROOT

# jinja2 3.1.4 has a published advisory (sandbox breakout through str.format; fixed in 3.1.5), as OSV lists it
ADVISORY = {"id": "GHSA-q2x7-8rv6-6q7h", "aliases": ["CVE-2024-56326"],
            "summary": "Jinja has a sandbox breakout through indirect reference to format method",
            # two branches, as advisories often list them: the fix named must be the one after 3.1.4
            "affected": [{"package": {"ecosystem": "PyPI", "name": "jinja2"},
                          "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.11.3"}]},
                                     {"type": "ECOSYSTEM", "events": [{"introduced": "3.0.0"}, {"fixed": "3.1.5"}]}]}]}


@pytest.fixture
def osv(httpserver):
    """OSV's API for a world where jinja2 3.1.4 has the advisory above and nothing else is known."""
    asked = []

    def batch(request: Request) -> Response:
        queries = json.loads(request.data)["queries"]
        asked.extend(queries)
        res = [{"vulns": [{"id": ADVISORY["id"], "modified": "2024-12-27T00:00:00Z"}]}
               if q["package"] == {"name": "jinja2", "ecosystem": "PyPI"} and q["version"] == "3.1.4" else {}
               for q in queries]
        return Response(json.dumps({"results": res}), content_type="application/json")

    httpserver.expect_request("/v1/querybatch", method="POST").respond_with_handler(batch)
    httpserver.expect_request(f"/v1/vulns/{ADVISORY['id']}").respond_with_json(ADVISORY)
    return httpserver.url_for("/").rstrip("/"), asked


def _stage(tmp_path, *wheels):
    for w in wheels:
        (tmp_path / "wheels").mkdir(exist_ok=True)
        (tmp_path / "wheels" / w).write_bytes(b"")
    return tmp_path


def test_a_carried_release_with_a_published_advisory_is_named_with_its_fix(osv, tmp_path, monkeypatch):
    url, asked = osv
    monkeypatch.setenv("AIRGAP_LLM_OSV_URL", url)
    stage = _stage(tmp_path, "Jinja2-3.1.4-py3-none-any.whl", "tqdm-4.70.1-py3-none-any.whl")
    said = []
    report = vulns.write(stage, "warn", said.append)
    assert {(q["package"]["name"], q["version"]) for q in asked} == {("jinja2", "3.1.4"), ("tqdm", "4.70.1")}
    assert report["checked"] and json.loads((stage / vulns.REPORT).read_text()) == report
    (v,) = report["vulnerabilities"]
    assert (v["package"], v["version"], v["id"], v["fixed_in"]) == ("jinja2", "3.1.4", "GHSA-q2x7-8rv6-6q7h", "3.1.5")
    text = "\n".join(said)
    assert "1 known in 1 of the 2 packages" in text and "jinja2 3.1.4: GHSA-q2x7-8rv6-6q7h (CVE-2024-56326)" in text
    assert "fixed in 3.1.5" in text
    # the spec's policy "refuse": no bundle, naming what to do
    with pytest.raises(BundlerError) as e:
        vulns.write(stage, "refuse", said.append)
    assert "policy refuses" in e.value.message and "fixed versions" in e.value.hint
    # a fixed release: nothing known, and "refuse" lets it through
    (stage / "wheels" / "Jinja2-3.1.4-py3-none-any.whl").rename(stage / "wheels" / "jinja2-3.1.5-py3-none-any.whl")
    assert vulns.write(stage, "refuse", said.append)["vulnerabilities"] == []


def test_a_database_that_cannot_be_asked_is_reported_as_not_checked(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AIRGAP_LLM_OSV_URL", f"http://127.0.0.1:{port}")
    stage = _stage(tmp_path, "jinja2-3.1.4-py3-none-any.whl")
    report = vulns.write(stage, "warn", lambda _: None)
    assert not report["checked"] and "could not be asked" in report["why"]
    assert vulns.summary(report)[0].startswith("vulnerabilities: NOT CHECKED")
    with pytest.raises(BundlerError, match="NOT CHECKED"):
        vulns.write(stage, "refuse", lambda _: None)


def test_the_policy_is_checked_with_the_spec_and_refuse_asks_the_database_before_the_build(write_spec, tmp_path,
                                                                                           osv, monkeypatch):
    from bundler import bundle

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    head = '[bundle]\nname = "x"\n[[models]]\nsource = "./m.gguf"\nsha256 = "' + "a" * 64 + '"\n'
    assert spec.load(write_spec(head)).policy.vulnerabilities == "warn"
    strict = spec.load(write_spec(head + '[policy]\nvulnerabilities = "refuse"\n'))
    assert strict.policy.vulnerabilities == "refuse"
    with pytest.raises(BundlerError, match="policy.vulnerabilities"):
        spec.load(write_spec(head + '[policy]\nvulnerabilities = "ignore"\n'))
    # "refuse" with no database to ask: bundler check (and bundle's first step) says so before any build
    monkeypatch.setenv("AIRGAP_LLM_OSV_URL", "off")
    with pytest.raises(BundlerError) as e:
        bundle.check(strict)
    assert 'vulnerabilities = \"refuse\" needs the vulnerability database' in e.value.message
    monkeypatch.setenv("AIRGAP_LLM_OSV_URL", osv[0])
    assert bundle.check(strict)


@pytest.mark.e2e
def test_the_bundle_carries_the_report_under_its_signature_and_the_box_shows_it(osv, tmp_path, signing_home):
    """The default bundle made against the database: the report is in the signed manifest, and
    install.sh --dry-run prints it on the box, with no network."""
    url, asked = osv
    from tests.e2e.conftest import GEMMA  # noqa: E402

    env = dict(__import__("os").environ, AIRGAP_LLM_OSV_URL=url)
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(GEMMA), "--out", str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vulnerabilities: none known in the" in r.stderr
    b = tmp_path / "d" / "gemma3-270m-cpu"
    assert any(f["path"] == "vulnerabilities.json" for f in json.loads((b / "manifest.json").read_text())["files"])
    d = subprocess.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"], capture_output=True,
                       text=True, env=env)
    assert d.returncode == 0, d.stderr
    assert "vulnerabilities: none known in the" in d.stderr and "checked " in d.stderr
    j = subprocess.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run", "--json"],
                       capture_output=True, text=True, env=env)
    report = json.loads(j.stdout)["vulnerabilities"]
    assert report["checked"] and report["policy"] == "warn"
    # the llama-server's source sdist was looked up beside the wheels
    assert {"name": "llama-cpp-python", "ecosystem": "PyPI"} in [q["package"] for q in asked]
    assert report["packages"] == len({(q["package"]["name"], q["version"]) for q in asked})
