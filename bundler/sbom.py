"""What a security office asks of a bundle before it crosses the gateway: a software bill of materials
(CycloneDX 1.5 JSON, `sbom.cdx.json`) and a readable license inventory (`LICENSES.txt`), both written
into the bundle before its manifest, so the signature covers them. Bundle side.

Every wheel (name, version, purl, sha256, license from its own metadata), every binary built here
(its source sdist, toolchain and flags), every model (source, revision, sha256, license from its
package metadata, GGUF header or model card) and third-party archives (TabbyAPI, from its LICENSE).
Deterministic: the same bundle makes the same bytes (no clock, a serial number derived from content),
so re-bundling unchanged inputs still installs as "nothing changed".
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

from . import __version__
from .contract.locks import WHEEL_RE, normalize

SBOM = "sbom.cdx.json"
LICENSES = "LICENSES.txt"
# licenses a security office must look at: copyleft over a network, non-commercial, use restrictions,
# model licenses with their own terms, and anything not known
RESTRICTIVE = re.compile(r"AGPL|\bGPL|LGPL|SSPL|\bNC\b|NON-?COMMERCIAL|LLAMA|GEMMA|RAIL|\bOTHER\b|UNKNOWN|"
                         r"COMMONS CLAUSE", re.I)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def license_of_metadata(text: str) -> str:
    """A distribution's license from its METADATA / PKG-INFO: License-Expression, else a short License
    field, else its OSI classifiers, else 'unknown'."""
    msg = email.parser.Parser().parsestr(text, headersonly=True)
    expr = (msg.get("License-Expression") or "").strip()
    if expr:
        return expr
    lic = (msg.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= 64 and lic.upper() not in ("UNKNOWN", "NONE"):
        return lic
    classes = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    classes = [c for c in classes if c not in ("OSI Approved",)]
    if classes:
        return " OR ".join(dict.fromkeys(classes))
    return license_of_text(lic) if lic else "unknown"


def license_of_text(text: str) -> str:
    """The license a LICENSE file's text is (the common ones), else 'unknown'."""
    t = text[:4000].upper()
    for needle, name in (("GNU AFFERO GENERAL PUBLIC LICENSE", "AGPL-3.0"), ("GNU LESSER GENERAL PUBLIC", "LGPL"),
                         ("GNU GENERAL PUBLIC LICENSE", "GPL"), ("APACHE LICENSE", "Apache-2.0"),
                         ("MIT LICENSE", "MIT"), ("PERMISSION IS HEREBY GRANTED, FREE OF CHARGE", "MIT"),
                         ("REDISTRIBUTION AND USE IN SOURCE AND BINARY FORMS", "BSD"),
                         ("MOZILLA PUBLIC LICENSE", "MPL-2.0"), ("THE UNLICENSE", "Unlicense")):
        if needle in t:
            return name
    return "unknown"


def _wheel_component(path: Path) -> dict[str, Any]:
    m = WHEEL_RE.match(path.name)
    name, version = (normalize(m["name"]), m["ver"]) if m else (path.stem, "")
    lic = "unknown"
    try:
        with zipfile.ZipFile(path) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            if meta:
                lic = license_of_metadata(z.read(meta).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile):
        pass
    purl = f"pkg:pypi/{name}@{version}"
    return {"type": "library", "bom-ref": f"{purl}#{path.name}", "name": name, "version": version, "purl": purl,
            "hashes": [{"alg": "SHA-256", "content": _sha256(path)}], "licenses": _lic(lic),
            "properties": [{"name": "airgap-llm:file", "value": path.name}]}


def _lic(name: str) -> list[dict[str, Any]]:
    return [{"license": {"name": name}}]


def _model_license(stage: Path, m: dict[str, Any]) -> str:
    """From the model's own words: its package's metadata (pypi:), its GGUF header's general.license, or
    the license of its model card (README.md front matter); 'unknown' where none says."""
    facts = m.get("facts") or {}
    if facts.get("license"):
        return str(facts["license"])
    src = str(m.get("source", ""))
    if src.startswith("pypi:"):
        from .lock import wheel_cache
        from .sources.pypi import own_wheels

        for w in own_wheels(src[5:], wheel_cache() / "models"):
            return _wheel_component(w)["licenses"][0]["license"]["name"]
    if m.get("dir"):
        card = stage / m["file"] / "README.md"
        if card.is_file():
            head = card.read_text(errors="replace").split("---", 2)
            if len(head) == 3:
                found = re.search(r"^license:\s*(\S.*)$", head[1], re.M)
                if found:
                    return found.group(1).strip().strip("'\"")
    return "unknown"


def build(stage: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str, str, str]]]:
    """(the CycloneDX document, the inventory rows: kind, name, version, license)."""
    comps: list[dict[str, Any]] = []
    rows: list[tuple[str, str, str, str]] = []
    for whl in sorted(stage.rglob("*.whl")):
        c = _wheel_component(whl)
        c["properties"].append({"name": "airgap-llm:path", "value": str(whl.relative_to(stage))})
        comps.append(c)
        rows.append(("wheel", c["name"], c["version"], c["licenses"][0]["license"]["name"]))
    for e in meta.get("engines", []):
        edir = stage / e["dir"]
        build_info = {}
        if (edir / "build.json").is_file():
            build_info = json.loads((edir / "build.json").read_text())
        if e.get("source"):  # a binary built here from a pinned source
            lic = _sdist_license(build_info)
            for b in sorted((edir / "bin").glob("*")) if (edir / "bin").is_dir() else []:
                if b.is_file():
                    comps.append({"type": "application", "bom-ref": f"{e['name']}:{e['dir']}/bin/{b.name}",
                                  "name": b.name, "version": e["source"].split("==")[-1],
                                  "hashes": [{"alg": "SHA-256", "content": _sha256(b)}], "licenses": _lic(lic),
                                  "properties": [{"name": "airgap-llm:source", "value": e["source"]},
                                                 {"name": "airgap-llm:source-sha256", "value": e["source_sha256"]},
                                                 {"name": "airgap-llm:toolchain",
                                                  "value": str(build_info.get("compiler", ""))},
                                                 {"name": "airgap-llm:backend", "value": e.get("backend", "")},
                                                 {"name": "airgap-llm:flags",
                                                  "value": str(build_info.get("cmake_args", build_info.get(
                                                      "cuda_archs", "")))}]})
            rows.append(("engine", f"{e['name']} ({e.get('backend', '')}) from {e['source']}", "", lic))
        if e.get("tabbyapi"):
            lic_file = stage / e["tabbyapi"] / "LICENSE"
            lic = license_of_text(lic_file.read_text(errors="replace")) if lic_file.is_file() else "unknown"
            comps.append({"type": "application", "bom-ref": f"tabbyapi:{e['name']}", "name": "tabbyAPI",
                          "version": e.get("tabbyapi_sha256", "")[:12], "licenses": _lic(lic),
                          "hashes": [{"alg": "SHA-256", "content": e["tabbyapi_sha256"]}]
                          if e.get("tabbyapi_sha256") else [],
                          "properties": [{"name": "airgap-llm:archive-sha256", "value": e.get("tabbyapi_sha256", "")}]})
            rows.append(("server", f"TabbyAPI for {e['name']}", "", lic))
    for m in meta.get("models", []):
        lic = _model_license(stage, m)
        props = [{"name": "airgap-llm:source", "value": str(m.get("source", ""))},
                 {"name": "airgap-llm:format", "value": str(m.get("format", ""))}]
        if m.get("commit"):
            props.append({"name": "airgap-llm:revision", "value": m["commit"]})
        if m.get("on_box"):
            props.append({"name": "airgap-llm:carried", "value": "separately (box:)"})
        comps.append({"type": "machine-learning-model", "bom-ref": f"model:{m['name']}", "name": m["name"],
                      "hashes": [{"alg": "SHA-256", "content": m["sha256"]}] if m.get("sha256") else [],
                      "licenses": _lic(lic), "properties": props})
        rows.append(("model", m["name"], str(m.get("commit", ""))[:12], lic))
    serial = uuid.UUID(hashlib.sha256(json.dumps(comps, sort_keys=True).encode()).hexdigest()[:32], version=5)
    doc = {"bomFormat": "CycloneDX", "specVersion": "1.5", "serialNumber": serial.urn, "version": 1,
           "metadata": {"tools": {"components": [{"type": "application", "name": "airgap-llm",
                                                  "version": __version__}]},
                        "component": {"type": "application", "bom-ref": "bundle", "name": meta["name"],
                                      "version": str(meta.get("version", ""))}},
           "components": comps}
    return doc, rows


def _sdist_license(build_info: dict[str, Any]) -> str:
    """llama-cpp-python's sdist (and the llama.cpp it vendors) say MIT in their PKG-INFO; read it there."""
    from .lock import wheel_cache

    folder = wheel_cache() / "sdists"  # where make bundle keeps the pinned sdist (bundle._fetch_sdist)
    for sd in sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []:
        if build_info.get("sdist") and sd.name == build_info["sdist"]:
            import tarfile

            with tarfile.open(sd) as tf:
                info = next((m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")),
                            None)
                if info is not None:
                    return license_of_metadata(tf.extractfile(info).read().decode("utf-8", "replace"))
    return "unknown"


def write(stage: Path, meta: dict[str, Any]) -> list[str]:
    """sbom.cdx.json and LICENSES.txt into the bundle; returns the summary's lines (restrictive and
    unknown licenses named)."""
    doc, rows = build(stage, meta)
    (stage / SBOM).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    flagged = [r for r in rows if RESTRICTIVE.search(r[3])]
    width = max((len(f"{k} {n} {v}") for k, n, v, _ in rows), default=10)
    lines = [f"Licenses of everything in the bundle {meta['name']} {meta.get('version', '')} "
             f"({len(rows)} components; the CycloneDX SBOM is {SBOM})", ""]
    lines += [f"{f'{k} {n} {v}'.ljust(width)}  {lic}" + ("   <-- check" if RESTRICTIVE.search(lic) else "")
              for k, n, v, lic in sorted(rows)]
    if flagged:
        lines += ["", "To check before the bundle crosses (restrictive, model-specific or unknown licenses):"]
        lines += [f"  {k} {n}: {lic}" for k, n, _, lic in flagged]
    (stage / LICENSES).write_text("\n".join(lines) + "\n")
    by: dict[str, int] = {}
    for r in rows:
        by[r[3]] = by.get(r[3], 0) + 1
    summary = [f"licenses: {len(rows)} components, " + ", ".join(f"{n}× {lic}" for lic, n in
                                                                 sorted(by.items(), key=lambda x: -x[1])[:6])]
    summary += [f"  check: {k} {n}: {lic}" for k, n, _, lic in flagged]
    return summary
