"""The offline vulnerability report a security office asks for: at bundle time every package the bundle
carries (each wheel, by name and version) is looked up in the OSV vulnerability database's HTTP API
(a batch query, then each advisory), and the result is written into the bundle as
`vulnerabilities.json` before its manifest, so the signature covers it. The box shows it
(install.sh --dry-run) without any network. The lookup runs at bundle time; the box only reads the
report (summary), so this module imports nothing of the bundle side.

The spec's `[policy] vulnerabilities` decides what a finding does: "warn" (the default: bundled,
named in the summary and the report), "refuse" (no bundle while a carried package has a known
vulnerability, or while the database cannot be asked). Where the database cannot be reached, the
report says so ("not checked", and why) rather than pretending the bundle is clean.

AIRGAP_LLM_OSV_URL names another OSV-compatible endpoint (a mirror inside the organisation); "off"
skips the lookup (the report says it was not checked).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .contract.locks import WHEEL_RE, normalize
from .errors import BundlerError

REPORT = "vulnerabilities.json"
DEFAULT_URL = "https://api.osv.dev"
BATCH = 500  # queries per request (OSV accepts up to 1000)
TIMEOUT = 15.0


def packages(stage: Path, sources: list[str] = ()) -> list[tuple[str, str]]:
    """(name, version) of every wheel the bundle carries and of each NAME==VERSION source it was built
    from (the llama-cpp-python sdist of llama-server), each once, sorted."""
    found = set()
    for whl in stage.rglob("*.whl"):
        m = WHEEL_RE.match(whl.name)
        if m:
            found.add((normalize(m["name"]), m["ver"]))
    for src in sources:
        name, sep, version = src.partition("==")
        if sep and name and version:
            found.add((normalize(name), version))
    return sorted(found)


def reachable(url: str | None = None) -> str:
    """Why the database cannot be asked ("" when it answers a query): `bundler check` asks before a
    bundle whose policy refuses without a report."""
    url = (url or os.environ.get("AIRGAP_LLM_OSV_URL", DEFAULT_URL)).strip()
    if url.lower() in ("", "off"):
        return "the lookup was turned off (AIRGAP_LLM_OSV_URL=off)"
    report = check([("pip", "24.0")], url)
    return "" if report["checked"] else report["why"]


def _post(url: str, doc: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.load(r)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return json.load(r)


def _fixed_in(vuln: dict[str, Any], name: str, version: str) -> str:
    """The first release after `version` that fixes it for this package, as the advisory's ranges say
    ("" if none is named): an advisory over several branches names a fix in each."""
    from .contract.trust import version_key

    have = version_key(version)
    fixes = []
    for a in vuln.get("affected") or []:
        if normalize(str((a.get("package") or {}).get("name", ""))) != name:
            continue
        for r in a.get("ranges") or []:
            for e in r.get("events") or []:
                key = version_key(e.get("fixed", "")) if e.get("fixed") else None
                if key is not None and (have is None or key > have):
                    fixes.append((key, str(e["fixed"])))
    return min(fixes)[1] if fixes else ""


def check(pkgs: list[tuple[str, str]], url: str) -> dict[str, Any]:
    """Ask the database about every package; the report (never raises for the network: an
    unreachable database is a report that says "not checked", and why)."""
    base = url.rstrip("/")
    try:
        results: list[Any] = []
        for i in range(0, len(pkgs), BATCH):
            chunk = pkgs[i:i + BATCH]
            got = _post(f"{base}/v1/querybatch", {"queries": [
                {"package": {"name": n, "ecosystem": "PyPI"}, "version": v} for n, v in chunk]})
            results += got.get("results") or []
            if len(results) != i + len(chunk):
                raise ValueError(f"{len(results)} results for {i + len(chunk)} queries")
        found = []
        details: dict[str, dict[str, Any]] = {}
        for (name, version), res in zip(pkgs, results):
            for v in res.get("vulns") or []:
                vid = str(v["id"])
                if vid not in details:
                    details[vid] = _get(f"{base}/v1/vulns/{vid}")
                d = details[vid]
                found.append({"package": name, "version": version, "id": vid,
                              "aliases": sorted(str(a) for a in d.get("aliases") or []),
                              "summary": str(d.get("summary") or d.get("details", "")[:200]),
                              "fixed_in": _fixed_in(d, name, version)})
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = getattr(e, "reason", None) or e
        return {"checked": False, "why": f"the database at {base} could not be asked ({why})", "source": base,
                "packages": len(pkgs), "vulnerabilities": []}
    return {"checked": True, "date": time.strftime("%Y-%m-%d", time.gmtime()), "source": base,
            "packages": len(pkgs), "vulnerabilities": found}


def write(stage: Path, policy: str, log=print, sources: list[str] = ()) -> dict[str, Any]:
    """vulnerabilities.json into the bundle; applies the spec's policy. Returns the report."""
    url = os.environ.get("AIRGAP_LLM_OSV_URL", DEFAULT_URL).strip()
    pkgs = packages(stage, sources)
    if url.lower() in ("", "off"):
        report = {"checked": False, "why": "the lookup was turned off (AIRGAP_LLM_OSV_URL=off)", "source": "",
                  "packages": len(pkgs), "vulnerabilities": []}
    else:
        log(f"asking the vulnerability database about {len(pkgs)} packages ({url})")
        report = check(pkgs, url)
    report["policy"] = policy
    (stage / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    for line in summary(report):
        log(line)
    if policy == "refuse" and (report["vulnerabilities"] or not report["checked"]):
        raise BundlerError("the spec's policy refuses this bundle: " + summary(report)[0],
                           hint="pin releases that fix them (the report names the fixed versions), or set "
                                "[policy] vulnerabilities = \"warn\" to bundle and let the security office decide")
    return report


def summary(report: dict[str, Any]) -> list[str]:
    """A few lines for people: what was checked, and each finding with its fix."""
    if not report.get("checked"):
        return [f"vulnerabilities: NOT CHECKED: {report.get('why', 'unknown')}"]
    vulns = report.get("vulnerabilities") or []
    if not vulns:
        return [f"vulnerabilities: none known in the {report['packages']} packages carried "
                f"(checked {report.get('date', '')} against {report.get('source', '')})"]
    pkgs = sorted({(v["package"], v["version"]) for v in vulns})
    lines = [f"vulnerabilities: {len(vulns)} known in {len(pkgs)} of the {report['packages']} packages carried "
             f"(checked {report.get('date', '')} against {report.get('source', '')})"]
    for v in vulns:
        aka = f" ({', '.join(v['aliases'][:2])})" if v.get("aliases") else ""
        fix = f"; fixed in {v['fixed_in']}" if v.get("fixed_in") else "; no fixed release named"
        lines.append(f"  {v['package']} {v['version']}: {v['id']}{aka}{fix}: {v.get('summary', '')[:100]}")
    return lines
