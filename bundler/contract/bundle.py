"""The bundle document (manifest.json) as the bundler writes it and the box reads it: one schema, checked
at both ends. The bundler checks what it is about to sign (it cannot write a manifest the box cannot
read); the installer checks what it verified before it plans, so a manifest from another version says
which key it lacks instead of failing as a KeyError deep inside. Standard library only.

Engine entries hold the fields every engine has (name, backend, dir, arch, glibc); the rest of an
entry is its engine's own (engines/NAME/build.py writes it, the engine's box side reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1  # manifest.json's "schema": a bundle with another one needs the installer it was made for


class ContractError(ValueError):
    """manifest.json does not hold what this version reads: the message names the key."""


def _get(doc: Any, where: str, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    if not isinstance(doc, dict):
        raise ContractError(f"{where or 'the manifest'} is not an object")
    if key not in doc:
        if default is ...:
            raise ContractError(f"{where + '.' if where else ''}{key} is missing")
        return default
    v = doc[key]
    if (isinstance(v, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,))) \
            or not isinstance(v, typ):
        raise ContractError(f"{where + '.' if where else ''}{key} is {type(v).__name__} {v!r:.60}, not "
                            f"{getattr(typ, '__name__', typ)}")
    return v


@dataclass(frozen=True)
class Service:
    host: str
    port: int
    concurrency: int
    context: int

    @classmethod
    def from_json(cls, d: Any, where: str = "service") -> Service:
        return cls(_get(d, where, "host", str), _get(d, where, "port", int), _get(d, where, "concurrency", int),
                   _get(d, where, "context", int))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    format: str
    file: str  # in the bundle (models/...), or on the box with on_box
    sha256: str  # "" only for a box: model carried without a pin
    source: str
    task: str = "chat"
    port: int = 0
    on_box: bool = False
    dir: bool = False  # a folder of files (a repository), hashed as one tree
    facts: dict[str, Any] | None = None  # what the planner needs (modelinfo.ModelInfo); None for box: models
    parts: tuple[dict[str, Any], ...] = ()  # a split GGUF's other files
    files: tuple[dict[str, Any], ...] = ()  # a repository's files

    @classmethod
    def from_json(cls, d: Any, where: str) -> ModelEntry:
        on_box = _get(d, where, "on_box", bool, False)
        facts = _get(d, where, "facts", (dict, type(None)), None)
        if facts is None and not on_box:
            raise ContractError(f"{where}.facts is missing (the planner's facts of a bundled model)")
        return cls(_get(d, where, "name", str), _get(d, where, "format", str), _get(d, where, "file", str),
                   _get(d, where, "sha256", str), _get(d, where, "source", str), _get(d, where, "task", str, "chat"),
                   _get(d, where, "port", int, 0), on_box, _get(d, where, "dir", bool, False), facts,
                   tuple(_get(d, where, "parts", list, [])), tuple(_get(d, where, "files", list, [])))


@dataclass(frozen=True)
class EngineEntry:
    name: str
    backend: str
    dir: str
    arch: str
    glibc: str
    fields: dict[str, Any] = field(default_factory=dict)  # the whole entry, the engine's own keys included

    @classmethod
    def from_json(cls, d: Any, where: str) -> EngineEntry:
        return cls(_get(d, where, "name", str), _get(d, where, "backend", str), _get(d, where, "dir", str),
                   _get(d, where, "arch", str), _get(d, where, "glibc", str), dict(d))


@dataclass(frozen=True)
class Assumptions:
    """What a bundle made for one box (its probe file) assumed of it; the installer refuses a box that breaks one."""

    python: str
    arch: str
    glibc_min: str
    driver_min: str = ""
    installed: dict[str, str] = field(default_factory=dict)
    python_path: str = ""

    @classmethod
    def from_json(cls, d: Any, where: str = "target") -> Assumptions:
        return cls(_get(d, where, "python", str), _get(d, where, "arch", str), _get(d, where, "glibc_min", str),
                   _get(d, where, "driver_min", str, ""), dict(_get(d, where, "installed", dict, {})),
                   _get(d, where, "python_path", str, ""))


@dataclass(frozen=True)
class Delta:
    """A delta bundle: it carries only what its base lacked; the files in from_base come from the base
    bundle (named by its manifest's sha256), each checked against this manifest's own sha256."""

    base_name: str
    base_version: str
    base_manifest_sha256: str
    from_base: tuple[str, ...]

    @classmethod
    def from_json(cls, d: Any, listed: set[str], where: str = "delta") -> Delta:
        base = _get(d, where, "base", dict)
        sha = _get(base, f"{where}.base", "manifest_sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ContractError(f"{where}.base.manifest_sha256 is not a sha256")
        paths = _get(d, where, "from_base", list)
        odd = [p for p in paths if not isinstance(p, str) or p not in listed]
        if odd:
            raise ContractError(f"{where}.from_base names {odd[0]!r}, which the manifest does not list")
        return cls(_get(base, f"{where}.base", "name", str), str(_get(base, f"{where}.base", "version", (str, int))),
                   sha, tuple(paths))


@dataclass(frozen=True)
class BundleDoc:
    name: str
    version: str
    models: tuple[ModelEntry, ...]
    engines: tuple[EngineEntry, ...]
    service: Service
    target: Assumptions | None
    pythons: tuple[str, ...]
    schema: int = SCHEMA
    delta: Delta | None = None

    @classmethod
    def from_json(cls, doc: Any) -> BundleDoc:
        """The document checked whole against this version's schema (ContractError names what is wrong)."""
        schema = _get(doc, "", "schema", int)
        if schema != SCHEMA:
            raise ContractError(f"schema is {schema}, this installer reads schema {SCHEMA}: install it with the "
                                "airgap-llm version that made it")
        models = _get(doc, "", "models", list)
        if not models:
            raise ContractError("models is empty")
        target = _get(doc, "", "target", (dict, type(None)), None)
        engines = _get(doc, "", "engines", list)
        return cls(_get(doc, "", "name", str), str(_get(doc, "", "version", (str, int, float))),
                   tuple(ModelEntry.from_json(m, f"models[{i}]") for i, m in enumerate(models)),
                   tuple(EngineEntry.from_json(e, f"engines[{i}]") for i, e in enumerate(engines)),
                   Service.from_json(_get(doc, "", "service", dict)),
                   Assumptions.from_json(target) if target is not None else None,
                   tuple(_get(doc, "", "pythons", list)), schema,
                   Delta.from_json(doc["delta"], {f.get("path") for f in _get(doc, "", "files", list, [])
                                                  if isinstance(f, dict)})
                   if doc.get("delta") is not None else None)
