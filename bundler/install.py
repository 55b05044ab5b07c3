"""The box side: `./install.sh` runs this from the bundle's wheels.

    verify → probe → plan → (dry run stops here) → release dir, venv, models
    → env file, launch script, unit → start → /health → chat smoke test → summary

Nothing under the prefix changes before the whole bundle has been verified.
A new release is switched to `current` only once it answered a chat request;
if it fails, the previous release (if any) is started again and the new
one removed. Runs on Python 3.9+, standard library plus jinja2 and tqdm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest as mf
from . import planner, probe
from .engines import llama_cpp, vllm
from .errors import BundlerError, VerifyError, report
from .modelinfo import ModelInfo
from .staging import staged_dir
from .planner import version_tuple
from .render import render

DEFAULT_PREFIX = "/opt/airgap-llm"


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Layout:
    prefix: Path
    etc: Path
    name: str

    @property
    def releases(self) -> Path:
        return self.prefix / "releases"

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def models(self) -> Path:
        return self.prefix / "models"

    @property
    def engines(self) -> Path:
        return self.prefix / "engines"

    @property
    def cache(self) -> Path:
        """Kernels the engines compile on first start (vLLM, FlashInfer, Triton), kept for the next."""
        return self.prefix / "cache"

    @property
    def env_file(self) -> Path:
        return self.etc / f"{self.name}.env"

    @property
    def pidfile(self) -> Path:
        return self.prefix / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.prefix / "log" / f"{self.name}.log"

    @property
    def unit(self) -> str:
        return f"airgap-llm-{self.name}.service"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="install.sh",
        description="Verify this bundle, plan the engine for this box, install it and start an "
                    "OpenAI-compatible service, then prove it answers. Never uses the network.",
        epilog="Environment: AIRGAP_LLM_PYTHON (python3 to use), AIRGAP_LLM_PREFIX (--prefix), "
               "AIRGAP_LLM_PORT (--port), AIRGAP_LLM_HOST (--host), AIRGAP_LLM_HEALTH_TIMEOUT (--timeout), "
               "AIRGAP_LLM_TRUST (--trust). "
               "Exit status: 0 done, 1 error, 2 usage, 3 the model cannot be served on this box.")
    p.add_argument("--bundle", required=True, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default=env("AIRGAP_LLM_PREFIX"),
                   help=f"install under this directory (default {DEFAULT_PREFIX}, which needs root)")
    p.add_argument("--config-dir", default=None,
                   help="where the env file with the API key goes (default /etc/airgap-llm as root, "
                        "PREFIX/etc otherwise)")
    p.add_argument("--host", default=env("AIRGAP_LLM_HOST"), help="address to listen on (default: the bundle's, "
                   "usually 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("AIRGAP_LLM_PORT", "0")) or None,
                   help="port to listen on (default: the bundle's)")
    p.add_argument("--concurrency", type=int, default=None, help="requests served at once (default: the bundle's)")
    p.add_argument("--context", type=int, default=None, help="tokens per request (default: the bundle's)")
    p.add_argument("--timeout", type=float, default=float(env("AIRGAP_LLM_HEALTH_TIMEOUT", "0")) or None,
                   help="seconds to wait for the engine to become healthy (default 300; 900 for vLLM)")
    p.add_argument("--model", dest="model_path", default=None,
                   help="serve this model already on the box (a GGUF file or an HF model directory) instead of "
                        "the bundle's; it is not covered by the bundle's manifest")
    p.add_argument("--model-facts", default=None,
                   help="JSON from `bundler inspect` for a --model GGUF when the gguf package is not on the box")
    p.add_argument("--model-name", default=None, help="name clients use for --model (default: its file name)")
    p.add_argument("--tensor-parallel", type=int, default=None,
                   help="vLLM: override the planned tensor-parallel size (checked against the model's heads)")
    p.add_argument("--data-parallel", type=int, default=None, help="vLLM: override the planned data-parallel size")
    p.add_argument("--safe-all-reduce", action="store_true",
                   help="vLLM with tensor parallel: start with the custom all-reduce and its fusion off (the default "
                        "where NCCL_NVLS_ENABLE=0 or TORCH_SYMM_MEM_DISABLE_MULTICAST=1 says NVLink multicast is "
                        "off; elsewhere a crashed start is retried with them)")
    p.add_argument("--bench", action="store_true",
                   help="after the install, load-test the service at concurrency 1 and the planned slots")
    p.add_argument("--bench-max-tokens", type=int, default=512, help="output tokens per bench request (512)")
    p.add_argument("--dry-run", action="store_true", help="verify, probe and print the plan; change nothing")
    p.add_argument("--probe", action="store_true", help="print this box's facts as JSON and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--no-smoke", action="store_true", help="skip the chat request after start")
    p.add_argument("--trust", action="append", default=[e for e in [env("AIRGAP_LLM_TRUST")] if e],
                   help="a signer's public key (minisign .pub) to trust; pinned under CONFIG/trusted.d once a bundle "
                        "it signed verifies (AIRGAP_LLM_TRUST)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="install a bundle without a valid signature from a pinned key (shouted, and recorded)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="install an older version than the last one accepted for this bundle name")
    p.add_argument("--yes", action="store_true", help="answer yes to pinning the signer's key on a first install")
    p.add_argument("--rollback", action="store_true",
                   help="switch back to the release installed before the current one and start it")
    p.add_argument("--uninstall", action="store_true",
                   help="stop the service and remove its releases, unit and env file (models are kept)")
    p.add_argument("--purge", action="store_true",
                   help="with --uninstall: remove the stored models, pinned keys and accepted versions too")
    p.add_argument("--service", choices=("auto", "systemd", "process"), default="auto",
                   help="systemd unit (where systemd is PID 1 and we are root) or a supervised background "
                        "process (default auto)")
    a = p.parse_args(argv)
    if a.port is not None and not 1 <= a.port <= 65535:
        p.error(f"--port {a.port} is outside 1..65535")
    for opt in ("concurrency", "context"):
        v = getattr(a, opt)
        if v is not None and v < 1:
            p.error(f"--{opt} must be at least 1, got {v}")
    return a


def layout_for(args: argparse.Namespace, name: str) -> Layout:
    root = os.geteuid() == 0
    if args.prefix:
        prefix = Path(args.prefix).expanduser().absolute()
    elif root:
        prefix = Path(DEFAULT_PREFIX)
    else:
        raise BundlerError(f"installing under {DEFAULT_PREFIX} needs root",
                           hint="run `sudo ./install.sh`, or `./install.sh --prefix $HOME/airgap-llm`")
    if args.config_dir:
        etc = Path(args.config_dir).expanduser().absolute()
    elif root and not args.prefix:
        etc = Path("/etc/airgap-llm")
    else:
        etc = prefix / "etc"
    return Layout(prefix, etc, name)


def verify_bundle(bundle: Path) -> dict[str, Any]:
    info(f"verifying {bundle} against its manifest")
    doc, problems = mf.verify(bundle, show_progress=True)
    if problems:
        lines = "\n".join("  " + p.describe() for p in problems)
        raise VerifyError(f"the bundle failed verification ({len(problems)} problem(s)); nothing was changed:\n"
                          f"{lines}", hint="copy the bundle again from its source; check it with: "
                          "sha256sum -c SHA256SUMS")
    for e in mf.entries_of(doc):
        if e.parts and not mf._whole_ok(bundle, e):
            info(f"joining {e.path} from {len(e.parts)} verified parts")
            mf.join_parts(bundle, e)
    info(f"verified {len(doc['files'])} files")
    return doc


def check_trust(bundle: Path, doc: dict[str, Any], layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """The bundle must be signed by a pinned key (or --allow-unsigned), and not older than the
    last version accepted for its name (or --allow-downgrade). Returns what to record."""
    from . import signing

    trusted_dir = layout.etc / "trusted.d"
    given = [(Path(t), signing.read_public_key(Path(t))) for t in args.trust]
    pinned = signing.pinned_keys(trusted_dir)
    sig = signing.read_signature(bundle)
    record: dict[str, Any] = {"version": doc.get("version", "0"), "unsigned": False, "key": "", "pin": None}

    def refuse_unless_allowed(message: str, hint: str, shout: str) -> None:
        if not args.allow_unsigned:
            raise BundlerError(f"{message}; nothing was changed", hint=hint)
        _shout(f"{shout}; installing anyway (--allow-unsigned), recorded in {layout.etc / 'accepted.json'}")
        record["unsigned"] = True

    if sig is None:
        refuse_unless_allowed(f"{bundle} is not signed ({signing.SIG_NAME} is missing)",
                              "ask for a signed bundle, or pass --allow-unsigned if you checked it another way",
                              "INSTALLING AN UNSIGNED BUNDLE: nothing proves who made it")
        return _check_downgrade(doc, layout, args, record)
    matching = [(p, k) for p, k in given + pinned if k.key_id == sig.key_id]
    if matching:
        if any(signing.check(bundle, sig, k) for _, k in matching):
            record["key"] = sig.fingerprint
            if matching[0][0].parent != trusted_dir:
                record["pin"] = str(matching[0][0])
        else:
            refuse_unless_allowed(f"the signature of {bundle / 'manifest.json'} does not verify with key "
                                  f"{sig.fingerprint} ({matching[0][0]})",
                                  "the manifest was changed after signing: copy the bundle again",
                                  f"THE SIGNATURE DOES NOT VERIFY (key {sig.fingerprint})")
    elif given or pinned:
        known = ", ".join(sorted({k.fingerprint for _, k in given + pinned}))
        refuse_unless_allowed(f"{bundle} is signed by key {sig.fingerprint}, which this box does not trust "
                              f"(trusted: {known})",
                              "if you expect that signer, get its .pub out of band and pass --trust FILE",
                              f"SIGNED BY AN UNTRUSTED KEY {sig.fingerprint}")
    else:
        offered = bundle / signing.SIGNER_PUB
        pub = signing.read_public_key(offered) if offered.exists() else None
        if pub is None or pub.key_id != sig.key_id or not signing.check(bundle, sig, pub):
            raise BundlerError(f"{bundle}: its signature does not verify with the key it names",
                               hint="copy the bundle again from its source")
        interactive = sys.stdin.isatty() and not args.json
        if args.yes or (interactive and _ask(f"This box trusts no signing key yet. The bundle is signed by key "
                                             f"{sig.fingerprint}. Compare it with what its maker told you. "
                                             "Trust this key from now on? [y/N] ")):
            record["key"], record["pin"] = sig.fingerprint, str(offered)
        else:
            refuse_unless_allowed(f"no signing key is pinned on this box, and the bundle is signed by "
                                  f"{sig.fingerprint}",
                                  "pass --trust KEY.pub (the public key you got from the bundle's maker out of "
                                  "band), or run interactively to confirm the fingerprint",
                                  f"KEY {sig.fingerprint} IS NOT PINNED")
    return _check_downgrade(doc, layout, args, record)


def _check_downgrade(doc: dict[str, Any], layout: Layout, args: argparse.Namespace,
                     record: dict[str, Any]) -> dict[str, Any]:
    accepted = _accepted(layout).get(doc["name"])
    if accepted and version_tuple(record["version"]) < version_tuple(accepted["version"]) and not args.allow_downgrade:
        raise BundlerError(f"{doc['name']} {record['version']} is older than {accepted['version']}, the version this "
                           "box accepted last; nothing was changed",
                           hint="install the newer bundle, or pass --allow-downgrade if you mean to go back")
    return record


def _shout(msg: str) -> None:
    bar = "!" * min(100, len(msg) + 4)
    print(f"{bar}\n! {msg}\n{bar}", file=sys.stderr, flush=True)


def _ask(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _accepted(layout: Layout) -> dict[str, Any]:
    try:
        return json.loads((layout.etc / "accepted.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def remember(layout: Layout, name: str, record: dict[str, Any]) -> None:
    """Pin the key the operator gave (or confirmed) and record the version accepted."""
    if record.get("pin"):
        d = layout.etc / "trusted.d"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record["pin"], d / f"{record['key']}.pub")
        info(f"pinned signing key {record['key']} in {d}")
    acc = _accepted(layout)
    acc[name] = {"version": record["version"], "key": record["key"], "unsigned": record["unsigned"],
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = layout.etc / "accepted.json.tmp"
    tmp.write_text(json.dumps(acc, indent=2) + "\n")
    os.replace(tmp, layout.etc / "accepted.json")


def preflight(doc: dict[str, Any], hw: probe.Hardware, layout: Layout) -> None:
    problems = []
    for e in doc["engines"]:
        if e["arch"] != hw.arch:
            problems.append(f"the bundled {e['name']} is built for {e['arch']}, this box is {hw.arch}")
        if version_tuple(hw.glibc) < version_tuple(e["glibc"]):
            problems.append(f"the bundled {e['name']} needs glibc >= {e['glibc']}, this box has {hw.glibc}; "
                            "bundle on a machine with an older glibc than the box's")
    need, wheel = wheels_glibc(doc, hw.python)
    if need and version_tuple(hw.glibc) < version_tuple(need):
        problems.append(f"the bundled wheel {wheel} needs glibc >= {need}, this box has {hw.glibc}; bundle against "
                        "this box's probe file (make bundle TARGET=box.json)")
    model_bytes = sum(f["size"] for f in doc["files"] if f["path"].startswith("models/"))
    other = sum(f["size"] for f in doc["files"]) - model_bytes
    existing = sum((layout.models / m["sha256"]).exists() for m in doc["models"])
    need = other * 2 + (0 if existing else model_bytes) + 64 * planner.MiB
    if hw.disk_free < need:
        problems.append(f"{hw.disk_path} has {hw.disk_free / 2**30:.2f} GiB free, the install needs "
                        f"{need / 2**30:.2f} GiB; free space there or pass --prefix on a larger disk")
    t = doc.get("target")
    if t:
        py = ".".join(hw.python.split(".")[:2])
        if t["python"] != py:
            problems.append(f"the bundle was made for Python {t['python']}, this installer runs on {py}; run it "
                            f"with AIRGAP_LLM_PYTHON={t.get('python_path') or 'python' + t['python']}")
        for name, version in sorted(t.get("installed", {}).items()):
            have = hw.installed.get(name)
            if have != version:
                problems.append(f"the bundle reuses {name} {version} from the box's python, which has "
                                f"{have or 'none'}; bundle again with this box's probe (./install.sh --probe)")
        if t.get("driver_min") and hw.gpus and version_tuple(hw.gpus[0].driver) < version_tuple(t["driver_min"]):
            problems.append(f"the bundled CUDA 13 engines need NVIDIA driver >= {t['driver_min']}, this box has "
                            f"{hw.gpus[0].driver}; update the driver")
    if problems:
        raise BundlerError("this box does not meet the bundle's needs:\n  " + "\n  ".join(problems),
                           hint="nothing was changed")


def wheels_glibc(doc: dict[str, Any], python: str) -> tuple[str, str]:
    """The newest glibc any bundled wheel for this Python needs (a wheel with several tags
    needs the oldest of them), and that wheel's name."""
    import re

    from .lock import WHEEL_RE

    tag = "cp" + "".join(python.split(".")[:2])
    worst, name = (0, 0), ""
    for f in doc["files"]:
        base = f["path"].rsplit("/", 1)[-1]
        w = WHEEL_RE.match(base)
        if not w:
            continue
        if not (w["py"].startswith("py") or w["py"] == tag or w["abi"] == "abi3"):
            continue  # a wheel for another Python (markupsafe is carried for each)
        needs = []
        for t in w["plat"].split("."):
            m = re.match(r"manylinux_(\d+)_(\d+)_", t)
            if m:
                needs.append((int(m.group(1)), int(m.group(2))))
            elif t.startswith("manylinux2014"):
                needs.append((2, 17))
            elif t.startswith("manylinux2010"):
                needs.append((2, 12))
            elif t.startswith("manylinux1"):
                needs.append((2, 5))
        if needs and min(needs) > worst:
            worst, name = min(needs), base
    return (f"{worst[0]}.{worst[1]}" if name else ""), name


def resolve_model(doc: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The model to serve: the bundle's, or one already on the box (--model or a box: source)."""
    m = dict(doc["models"][0])
    if args.model_path:
        path = Path(args.model_path).expanduser().absolute()
        m = {"name": args.model_name or (path.name.rsplit(".", 1)[0] if path.is_file() else path.name),
             "file": str(path), "on_box": True, "sha256": "", "facts": None,
             "format": "safetensors" if path.is_dir() else "gguf", "source": f"box:{path}"}
    if not m.get("on_box"):
        return m
    path = Path(m["file"])
    if not path.exists():
        raise BundlerError(f"model {path} is not on this box", hint="copy it there, or pass --model PATH")
    if m["sha256"] and path.is_file():
        actual = mf.sha256_file(path)  # a box model can be many GB: hash it once
        if actual != m["sha256"]:
            raise VerifyError(f"{path}: sha256 mismatch: expected {m['sha256']}, got {actual}",
                              hint="copy the model again")
    from . import modelinfo

    if args.model_facts:
        m["facts"] = json.loads(Path(args.model_facts).read_text())
    elif path.is_dir():
        m["facts"] = modelinfo.inspect_hf(path).to_dict()
        m["format"] = m["facts"]["format"]
    else:
        try:
            m["facts"] = modelinfo.inspect_gguf(path).to_dict()
        except BundlerError as e:
            raise BundlerError(f"cannot read {path}'s GGUF header here ({e.message})",
                               hint="run `bundler inspect MODEL > facts.json` where the gguf package is, then pass "
                                    "--model-facts facts.json")
    info(f"model {m['name']}: {path} (on the box" + (", sha256 checked)" if m["sha256"] else ", not pinned)"))
    return m


def make_plan(doc: dict[str, Any], m: dict[str, Any], hw: probe.Hardware, args: argparse.Namespace) -> planner.Plan:
    service = doc["service"]
    intent = planner.Intent(concurrency=args.concurrency or service["concurrency"],
                            context=args.context or service["context"])
    flags: tuple[str, ...] = ()
    available = []
    for e in doc["engines"]:
        if e["name"] == llama_cpp.NAME:
            available.append(e["backend"])
            if e["backend"] == "cpu":
                flags = tuple(e.get("cpu_flags", ()))
        else:
            available.append(e["name"])
    return planner.plan(m["name"], ModelInfo.from_dict(m["facts"]), hw, intent,
                        engines_available=tuple(available), cpu_flags_needed=flags)


def override_parallel(plan: planner.Plan, m: dict[str, Any], hw: probe.Hardware,
                      args: argparse.Namespace) -> planner.Plan:
    """--tensor-parallel / --data-parallel replace the planner's choice (vLLM), within what fits."""
    if args.tensor_parallel is None and args.data_parallel is None:
        return plan
    if plan.engine != "vllm":
        raise BundlerError(f"--tensor-parallel/--data-parallel apply to vLLM; this plan uses {plan.engine}",
                           hint="drop the option")
    from dataclasses import replace

    info_ = ModelInfo.from_dict(m["facts"])
    tp = args.tensor_parallel or plan.tensor_parallel
    dp = args.data_parallel or max(1, len(hw.gpus) // tp)
    ok, _ = planner.tp_candidates(info_, len(hw.gpus))
    if tp not in ok or tp * dp > len(hw.gpus):
        raise BundlerError(f"tensor parallel {tp} × data parallel {dp} does not fit this model on {len(hw.gpus)} "
                           "GPU(s)", hint=f"tensor-parallel sizes that work here: {', '.join(map(str, ok))}")
    seqs = max(1, -(-plan.slots // dp))
    return replace(plan, tensor_parallel=tp, data_parallel=dp, max_num_seqs=seqs,
                   reasons=(*plan.reasons, f"overridden on the command line: tensor parallel {tp} × data parallel "
                                           f"{dp}, {seqs} sequences per replica"))


def check_port(host: str, port: int, layout: Layout) -> None:
    """Refuse a port another program holds (ours is stopped and restarted by the upgrade)."""
    import socket

    if layout.current.is_symlink() and is_running(layout.current.resolve()):
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise BundlerError(f"port {port} on {host} is taken by another program ({e.strerror}); nothing was "
                               "changed", hint=f"free it, or pick another with --port (e.g. --port {port + 1})")


def release_id(doc_sha: str, plan: planner.Plan, host: str, port: int) -> str:
    h = hashlib.sha256(doc_sha.encode())
    # only the decisions: the reasons quote free RAM, which moves between runs
    decided = {k: v for k, v in plan.to_dict().items() if k not in ("reasons", "rejected", "ram_bytes")}
    h.update(json.dumps([decided, host, port], sort_keys=True).encode())
    return h.hexdigest()[:12]


# ---- service control -------------------------------------------------------------

def service_mode(args: argparse.Namespace, hw: probe.Hardware) -> str:
    if args.service == "systemd":
        if not hw.systemd_pid1:
            raise BundlerError("--service systemd: systemd is not PID 1 on this box",
                               hint="use --service process (a supervised background process)")
        return "systemd"
    if args.service == "auto" and hw.systemd_pid1 and os.geteuid() == 0:
        return "systemd"
    return "process"


def ctl(release: Path, action: str) -> int:
    return subprocess.run([str(release / "bin" / "ctl"), action], stdout=sys.stderr, stderr=sys.stderr).returncode


def is_running(release: Path) -> bool:
    return subprocess.run([str(release / "bin" / "ctl"), "status"], capture_output=True).returncode == 0


def engine_alive(release: Path, layout: Layout, mode: str) -> bool:
    """While starting: the service runs and its engine has not died yet (the supervisor
    would restart it forever; systemd likewise), so a crashed start is seen at once."""
    if not is_running(release):
        return False
    if mode == "process":
        return not Path(f"{layout.pidfile}.restarts").exists()
    out = subprocess.run(["systemctl", "show", "-p", "NRestarts", "--value", layout.unit], capture_output=True,
                         text=True).stdout.strip()
    return out in ("", "0")


def http_json(url: str, body: Any = None, key: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    # The box has no network and must never try: no proxy, loopback or the given host only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


class LogWatch:
    """New lines of the service log since the start, searched for lines after which the
    engine will never become healthy."""

    def __init__(self, path: Path, patterns: tuple[str, ...]):
        self.path, self.patterns = path, patterns
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0

    def fatal(self) -> str:
        if not self.patterns:
            return ""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                text = f.read(8 << 20).decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        for line in text.splitlines():
            if any(p in line for p in self.patterns):
                return line.strip()[:300]
        return ""


def wait_healthy(base: str, timeout: float, logfile: str, alive, watch: LogWatch | None = None) -> float:
    from tqdm import tqdm

    t0 = time.monotonic()
    with tqdm(total=None, desc="waiting for the engine to load", unit="s", bar_format="{desc}: {elapsed}",
              file=sys.stderr, mininterval=0.5) as bar:
        while True:
            try:
                code, _ = http_json(base + "/health", timeout=2)
                if code == 200:
                    return time.monotonic() - t0
            except (OSError, ValueError):
                pass
            if not alive():
                raise BundlerError("the engine stopped while starting", hint=f"see its log: {logfile}")
            line = watch.fatal() if watch else ""
            if line:
                raise BundlerError(f"the engine failed while starting: {line}", hint=f"see its log: {logfile}")
            if time.monotonic() - t0 > timeout:
                raise BundlerError(f"the engine was not healthy after {timeout:.0f}s",
                                   hint=f"see its log: {logfile}; a slow box may need --timeout")
            bar.update(0)
            time.sleep(0.5)


def smoke(base: str, model: str, key: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
            "max_tokens": 48, "temperature": 0}
    code, resp = http_json(base + "/v1/chat/completions", body, key=key, timeout=120)
    if code != 200:
        raise BundlerError(f"the chat smoke test got HTTP {code}: {resp}", hint="see the engine's log")
    text = (resp or {}).get("choices", [{}])[0].get("message", {}).get("content") or ""
    if not text.strip():
        raise BundlerError("the chat smoke test got an empty answer", hint="see the engine's log")
    code_nokey, _ = http_json(base + "/v1/models", timeout=10)
    if code_nokey != 401:
        raise BundlerError(f"a request without the API key got HTTP {code_nokey}, not 401",
                           hint="the service is not protected by its key; see the env file")
    return text.strip()


# ---- building a release ----------------------------------------------------------

def _run_logged(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BundlerError(f"{what} failed (exit {proc.returncode}):\n{tail}", hint=" ".join(cmd))


def _copy_with_progress(src: Path, dst: Path, label: str) -> None:
    from tqdm import tqdm

    tmp = dst.with_name(dst.name + ".incomplete")
    size = src.stat().st_size
    with open(src, "rb") as fi, open(tmp, "wb") as fo, tqdm(total=size, unit="B", unit_scale=True,
                                                            unit_divisor=1024, desc=label, file=sys.stderr,
                                                            mininterval=0.3) as bar:
        while True:
            block = fi.read(8 << 20)
            if not block:
                break
            fo.write(block)
            bar.update(len(block))
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def store_model(bundle: Path, m: dict[str, Any], layout: Layout) -> Path:
    """Models are stored once by content: PREFIX/models/SHA256/FILE."""
    dest = layout.models / m["sha256"] / Path(m["file"]).name
    if dest.is_file() and dest.stat().st_size == (bundle / m["file"]).stat().st_size:
        if mf.sha256_file(dest) == m["sha256"]:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _copy_with_progress(bundle / m["file"], dest, f"model {Path(m['file']).name}")
    return dest


def engine_site(bundle: Path, engine: dict[str, Any], layout: Layout, pip_whl: Path, env: dict[str, str]) -> Path:
    """vLLM's wheels installed once per lock under PREFIX/engines and shared by the releases that use
    that lock: a re-plan (other TP/DP, context, port) or a rollback does not reinstall a GB of wheels."""
    lockfile = bundle / engine["dir"] / "requirements.lock"
    home = layout.engines / f"vllm-{engine['version']}-{mf.sha256_file(lockfile)[:16]}"
    if (home / "complete").is_file():
        info(f"vLLM {engine['version']}: reusing {home} (same lock)")
        return home / "site"
    info(f"installing vLLM {engine['version']} into {home} ({engine['lock']['carried']} wheels; "
         f"{engine['lock']['reused']} packages reused from this box's python; compiling to bytecode once, so "
         "that every engine process does not: each start imports vLLM in 3 to 6 processes)")
    with staged_dir(home, home.with_name(home.name + ".partial")) as partial:
        _run_logged([sys.executable, "-s", str(pip_whl / "pip"), "install", "--quiet", "--no-index", "--no-deps",
                     "--find-links", str(bundle / engine["dir"] / "wheels"), "--require-hashes",
                     "--no-cache-dir", "--target", str(partial / "site"),
                     "-r", str(lockfile)], "installing vLLM's wheels", env)
        shutil.copy2(lockfile, partial / "requirements.lock")
        (partial / "complete").write_text(engine["version"] + "\n")
    return home / "site"


def build_release(bundle: Path, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, layout: Layout,
                  rid: str, host: str, port: int, mode: str, safe: bool = False) -> Path:
    final = layout.releases / rid
    with staged_dir(final, layout.releases / f".{rid}.partial") as stage:
        for name in ("manifest.json", "README.txt", "requirements.lock"):
            shutil.copy2(bundle / name, stage / name)
        info("creating the release's Python environment (venv --without-pip + bundled wheels)")
        _run_logged([sys.executable, "-m", "venv", "--without-pip", str(stage / "venv")], "creating the venv")
        pip_whl = next((bundle / "wheels").glob("pip-*.whl"))
        env = dict(os.environ, PIP_CONFIG_FILE="/dev/null", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        env.pop("PYTHONPATH", None)
        _run_logged([str(stage / "venv" / "bin" / "python"), str(pip_whl / "pip"), "install", "--quiet",
                     "--no-index", "--find-links", str(bundle / "wheels"), "--require-hashes", "--no-cache-dir",
                     "--no-compile", "-r", str(bundle / "requirements.lock")], "installing the bundled wheels", env)
        model_path = Path(m["file"]) if m.get("on_box") else store_model(bundle, m, layout)
        final_engine = final / "engine"
        lib_dirs: list[str] = []
        extra_env: dict[str, str] = {}
        cache_vars: dict[str, str] = {}
        if plan.engine == "vllm":
            engine = next(e for e in doc["engines"] if e["name"] == vllm.NAME)
            site = engine_site(bundle, engine, layout, pip_whl, env)
            argv = vllm.launch_argv(sys.executable, str(model_path), m["name"], host, port, plan, safe,
                                    engine["version"])
            extra_env = {"PYTHONPATH": str(site), **vllm.OFFLINE_ENV, **vllm.multicast_env(dict(os.environ))}
            cache_vars = vllm.CACHE_VARS
        else:
            engine = next(e for e in doc["engines"] if e["name"] == llama_cpp.NAME and e["backend"] == plan.backend)
            shutil.copytree(bundle / engine["dir"], stage / "engine")
            argv = llama_cpp.launch_argv(str(final_engine / "bin" / "llama-server"), str(model_path), m["name"],
                                         host, port, plan)
            lib_dirs = [str(final_engine / "lib"), *engine.get("box_lib_dirs", [])]
        bindir = stage / "bin"
        bindir.mkdir()
        launch = render("launch.sh.j2", {"engine": plan.engine, "name": layout.name, "release": rid,
                                          "env_file": str(layout.env_file), "argv": argv,
                                          "lib_dir": ":".join(lib_dirs), "extra_env": extra_env,
                                          "cache_dir": str(layout.cache), "cache_vars": cache_vars})
        (bindir / "launch").write_text(launch)
        ctx = {"name": layout.name, "mode": mode, "unit": layout.unit, "pidfile": str(layout.pidfile),
               "logfile": str(layout.logfile), "python": str(final / "venv" / "bin" / "python"),
               "launch": str(final / "bin" / "launch"), "prefix": str(layout.prefix)}
        (bindir / "ctl").write_text(render("ctl.sh.j2", ctx))
        for f in ("launch", "ctl"):
            (bindir / f).chmod(0o755)
        (stage / "systemd").mkdir()
        (stage / "systemd" / layout.unit).write_text(render("unit.service.j2", {
            "name": layout.name, "engine": plan.engine, "model": m["name"], "prefix": str(layout.prefix),
            "env_file": str(layout.env_file), "gpus": plan.backend == "cuda"}))
        (stage / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return final


def ensure_env_file(layout: Layout) -> str:
    """Create the env file with a fresh API key once; keep the key on later installs."""
    path = layout.env_file
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("LLAMA_API_KEY="):
                key = line.split("=", 1)[1].strip()
                if key:
                    break
        else:
            key = ""
        if key:
            return key
    key = "sk-" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render("env.j2", {"name": layout.name, "api_key": key}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def read_key(layout: Layout) -> str:
    for line in layout.env_file.read_text().splitlines():
        if line.startswith("LLAMA_API_KEY="):
            return line.split("=", 1)[1].strip()
    raise BundlerError(f"{layout.env_file} holds no LLAMA_API_KEY", hint="delete it and run install.sh again")


def switch_current(layout: Layout, release: Path) -> None:
    tmp = layout.prefix / ".current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path("releases") / release.name, tmp)
    os.replace(tmp, layout.current)
    with open(layout.releases / "history", "a") as f:  # the order releases went live, for --rollback
        f.write(release.name + "\n")


def history(layout: Layout) -> list[str]:
    try:
        names = (layout.releases / "history").read_text().split()
    except FileNotFoundError:
        return []
    return [n for n in names if (layout.releases / n).is_dir()]


def rollback(layout: Layout, hw: probe.Hardware, args: argparse.Namespace) -> dict[str, Any]:
    if not layout.current.is_symlink():
        raise BundlerError(f"nothing is installed under {layout.prefix}", hint="check --prefix")
    current = layout.current.resolve()
    older = [n for n in history(layout) if n != current.name]
    if not older:
        raise BundlerError(f"{current.name} is the only release under {layout.releases}; nothing to roll back to",
                           hint="install the bundle you want instead")
    target = layout.releases / older[-1]
    mode = service_mode(args, hw)
    info(f"rolling back from {current.name} to {target.name}")
    if is_running(current):
        ctl(current, "stop")
    plan = json.loads((target / "plan.json").read_text())
    doc = json.loads((target / "manifest.json").read_text())
    host, port = _listen_of(target)
    start(target, mode, layout)
    base = f"http://{host}:{port}"
    try:
        wait_healthy(base, args.timeout or 900.0, str(layout.logfile), lambda: engine_alive(target, layout, mode))
    except BundlerError:
        ctl(target, "stop")
        start(current, mode, layout)
        raise
    switch_current(layout, target)
    info(f"{target.name} is serving again; {current.name} is kept (run --rollback again to return to it)")
    m = {"name": plan["model"]}
    return summary(layout, doc, m, planner.Plan(**{k: v for k, v in plan.items()
                                                   if k in planner.Plan.__dataclass_fields__}),
                   host, port, mode, None, changed=True)


def _listen_of(release: Path) -> tuple[str, int]:
    text = (release / "bin" / "launch").read_text()
    import re

    host = re.search(r"--host '?([^' ]+)'?", text)
    port = re.search(r"--port '?(\d+)'?", text)
    return local_address(host.group(1) if host else "127.0.0.1"), int(port.group(1) if port else 8080)


def local_address(host: str) -> str:
    """Where this box reaches a service listening on host (a wildcard means loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def uninstall(layout: Layout, purge: bool) -> None:
    if layout.current.is_symlink():
        cur = layout.current.resolve()
        if cur.is_dir() and is_running(cur):
            ctl(cur, "stop")
    unit = Path("/etc/systemd/system") / layout.unit
    if unit.exists():
        subprocess.run(["systemctl", "disable", "--now", layout.unit], capture_output=True)
        unit.unlink()
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    removed = []
    for p in (layout.current, layout.releases, layout.engines, layout.cache, layout.env_file, layout.pidfile.parent,
              layout.logfile.parent):
        if p.is_symlink() or p.is_file():
            p.unlink()
            removed.append(str(p))
        elif p.is_dir():
            shutil.rmtree(p)
            removed.append(str(p))
    for marker in layout.prefix.glob(".upgrade-*.done"):
        marker.unlink()
    if purge:
        for p in (layout.models, layout.etc / "trusted.d", layout.etc / "accepted.json"):
            if p.is_dir():
                shutil.rmtree(p)
                removed.append(str(p))
            elif p.exists():
                p.unlink()
                removed.append(str(p))
    info("removed: " + (", ".join(removed) if removed else "nothing (not installed here)"))
    if not purge and layout.models.is_dir():
        info(f"kept the models in {layout.models} (--purge removes them)")


def start(release: Path, mode: str, layout: Layout) -> None:
    if mode == "systemd":
        unit_src = release / "systemd" / layout.unit
        shutil.copy2(unit_src, Path("/etc/systemd/system") / layout.unit)
        _run_logged(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        _run_logged(["systemctl", "enable", "--now", layout.unit], f"systemctl enable --now {layout.unit}")
    else:
        layout.pidfile.parent.mkdir(parents=True, exist_ok=True)
        layout.logfile.parent.mkdir(parents=True, exist_ok=True)
        if ctl(release, "start") != 0:
            raise BundlerError("the service did not start", hint=f"see {layout.logfile}")


def stop_command(layout: Layout, mode: str) -> str:
    if mode == "systemd":
        return f"systemctl stop {layout.unit}"
    return f"{layout.current}/bin/ctl stop"


def summary(layout: Layout, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, host: str, port: int,
            mode: str, answer: str | None, changed: bool) -> dict[str, Any]:
    endpoint = f"http://{local_address(host)}:{port}/v1"
    return {
        "endpoint": endpoint,
        "api_key_file": str(layout.env_file),
        "model": m["name"],
        "engine": plan.engine,
        "service": (layout.unit if mode == "systemd"
                    else f"process (pid file {layout.pidfile}, log {layout.logfile})"),
        "stop_command": stop_command(layout, mode),
        "release": str(layout.current.resolve()),
        "changed": changed,
        "answer": answer,
        "curl": (f"curl -s {endpoint}/chat/completions -H \"Authorization: Bearer "
                 f"$(sed -n 's/^LLAMA_API_KEY=//p' {layout.env_file})\" -H 'Content-Type: application/json' "
                 f"-d '{{\"model\": \"{m['name']}\", \"messages\": "
                 "[{\"role\": \"user\", \"content\": \"Hello\"}]}'"),
    }


def print_plan(plan: planner.Plan, hw: probe.Hardware) -> None:
    info(f"box: {hw.cpus} CPUs, {hw.ram_available / 2**30:.1f} GiB RAM available, "
         f"{len(hw.gpus)} GPU(s), glibc {hw.glibc}, Python {hw.python}, {hw.os}")
    info(f"plan: {plan.engine} ({plan.backend}), {plan.threads} threads, {plan.slots} slots × "
         f"{plan.context_per_slot} tokens")
    for r in plan.reasons:
        info(f"  because: {r}")
    for r in plan.rejected:
        info(f"  not {r['engine']}: {r['why']}")


@dataclass(frozen=True)
class Service:
    host: str
    port: int
    mode: str  # "systemd" or "process"
    timeout: float  # seconds to wait for health
    base: str  # http://ADDRESS:PORT


def _same_release(previous: Path, layout: Layout, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan,
                  svc: Service, args: argparse.Namespace) -> dict[str, Any]:
    """The release this bundle and plan make is the current one: leave it, or start it if it is down."""
    if is_running(previous):
        code, _ = http_json(svc.base + "/health")
        if code == 200:
            info(f"release {previous.name} is installed and healthy; nothing changed")
            return summary(layout, doc, m, plan, svc.host, svc.port, svc.mode, None, changed=False)
    info(f"release {previous.name} is installed but not running; starting it")
    start(previous, svc.mode, layout)
    wait_healthy(svc.base, svc.timeout, str(layout.logfile), lambda: engine_alive(previous, layout, svc.mode))
    answer = None if args.no_smoke else smoke(svc.base, m["name"], read_key(layout))
    return summary(layout, doc, m, plan, svc.host, svc.port, svc.mode, answer, changed=True)


def _prepare_prefix(layout: Layout) -> str:
    """The prefix's folders, no half-built release left by a killed installer, and the API key."""
    layout.prefix.mkdir(parents=True, exist_ok=True)
    for d in (layout.releases, layout.models, layout.etc):
        d.mkdir(parents=True, exist_ok=True)
    for stale in layout.releases.glob(".*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    os.chmod(layout.etc, 0o700)  # holds the API key
    return ensure_env_file(layout)


def _start_new_release(bundle: Path, doc: dict[str, Any], m: dict[str, Any], plan: planner.Plan, layout: Layout,
                       rid: str, svc: Service, key: str, args: argparse.Namespace) -> tuple[Path, str | None, float]:
    """Build the release, start it and wait until it answers: (release, smoke answer, start time).
    A release that fails is stopped and removed before the error goes up."""
    # vLLM with tensor parallel can crash in its all-reduce paths where NVLink multicast is
    # off (VMs, PCIe cards): a crashed start is retried once with the safe flags, and said so.
    tries = [False, True] if plan.engine == "vllm" and plan.tensor_parallel > 1 else [False]
    if len(tries) > 1 and (args.safe_all_reduce or vllm.multicast_off(dict(os.environ))):
        tries = [True]
        info("tensor parallel with the safe all-reduce flags from the start (" +
             ("--safe-all-reduce" if args.safe_all_reduce else "NVLink multicast is off in this environment") + ")")
    for safe in tries:
        release = build_release(bundle, doc, m, plan, layout, rid + ("-safe" if safe else ""), svc.host, svc.port,
                                svc.mode, safe=safe)
        info(f"release {release.name} built at {release}")
        t0 = time.monotonic()
        watch = LogWatch(layout.logfile, vllm.FATAL_LOG if plan.engine == "vllm" else ())
        try:
            start(release, svc.mode, layout)
            secs = wait_healthy(svc.base, svc.timeout, str(layout.logfile),
                                lambda r=release: engine_alive(r, layout, svc.mode), watch)
            info(f"healthy after {secs:.1f}s")
            return release, (None if args.no_smoke else smoke(svc.base, m["name"], key)), t0
        except BaseException as e:
            ctl(release, "stop")
            shutil.rmtree(release, ignore_errors=True)
            if not safe and len(tries) > 1 and isinstance(e, BundlerError):
                warn(f"vLLM with tensor parallel {plan.tensor_parallel} failed to start ({e.message}); retrying "
                     "with the safe flags: --disable-custom-all-reduce and the all-reduce fusion off")
                continue
            warn(f"release {release.name} failed; removed it")
            raise
    raise AssertionError("unreachable: the last try returns or raises")


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    bundle = Path(args.bundle).absolute()
    doc0 = mf.load(bundle)
    if args.probe:
        hw = probe.probe(Path(args.prefix or DEFAULT_PREFIX))
        print(json.dumps(hw.to_dict(), indent=2))
        return None
    layout = layout_for(args, doc0["name"])
    if args.uninstall:
        uninstall(layout, args.purge)
        return None
    if args.rollback:
        return rollback(layout, probe.probe(layout.prefix), args)
    doc = verify_bundle(bundle)
    trust = check_trust(bundle, doc, layout, args)
    hw = probe.probe(layout.prefix)
    preflight(doc, hw, layout)
    m = resolve_model(doc, args)
    plan = make_plan(doc, m, hw, args)
    plan = override_parallel(plan, m, hw, args)
    print_plan(plan, hw)
    host = args.host or doc["service"]["host"]
    port = args.port or doc["service"]["port"]
    mode = service_mode(args, hw)
    timeout = args.timeout or (900.0 if plan.engine == "vllm" else 300.0)
    if args.dry_run:
        info(f"dry run: would install release under {layout.releases}, env file {layout.env_file}, "
             f"service as {mode}, listening on {host}:{port}; nothing was changed")
        if args.json:
            print(json.dumps({"dry_run": True, "plan": plan.to_dict(), "box": hw.to_dict(),
                              "prefix": str(layout.prefix), "service": mode}, indent=2))
        return None

    rid = release_id(mf.sha256_file(bundle / mf.MANIFEST) + m["file"], plan, host, port)
    svc = Service(host, port, mode, timeout, f"http://{local_address(host)}:{port}")
    previous = layout.current.resolve() if layout.current.is_symlink() else None
    if previous is not None and previous.name.split("-safe")[0] == rid and previous.is_dir():
        return _same_release(previous, layout, doc, m, plan, svc, args)

    check_port(host, port, layout)
    key = _prepare_prefix(layout)
    done = layout.prefix / f".upgrade-{os.getpid()}.done"  # read (and removed) by the guard only
    guarded = previous is not None and previous.is_dir() and is_running(previous)
    if guarded:
        assert previous is not None
        # if this process dies from here on, the guard brings the previous release back
        subprocess.Popen([sys.executable, "-m", "bundler.guard", "--pid", str(os.getpid()), "--done", str(done),
                          "--ctl", str(previous / "bin" / "ctl"), "--remove", str(layout.releases / rid)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
        info(f"stopping the previous release {previous.name}")
        ctl(previous, "stop")
    try:
        release, answer, t0 = _start_new_release(bundle, doc, m, plan, layout, rid, svc, key, args)
    except BaseException:
        if guarded:  # the box as it was: the previous release serving again
            assert previous is not None
            warn(f"restarting the previous release {previous.name}")
            start(previous, mode, layout)
            done.touch()
        raise
    if guarded:
        done.touch()  # healthy and answering: from here on the guard must not undo it
    switch_current(layout, release)
    remember(layout, doc["name"], trust)
    info(f"first answer {time.monotonic() - t0:.1f}s after start")
    result = summary(layout, doc, m, plan, host, port, mode, answer, changed=True)
    if args.bench:
        from . import bench

        report = bench.sweep(svc.base + "/v1", key, m["name"], sorted({1, plan.slots}), None, 400,
                             args.bench_max_tokens)
        info(bench.table(report))
        result["bench"] = report
    return result


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        "",
        f"airgap-llm is serving {s['model']} with {s['engine']}" + ("" if s["changed"] else " (unchanged)"),
        f"  endpoint:     {s['endpoint']}",
        f"  API key in:   {s['api_key_file']}",
        f"  service:      {s['service']}",
        f"  stop with:    {s['stop_command']}",
        f"  try it:       {s['curl']}",
    ]
    if s.get("answer"):
        lines.append(f"  model said:   {s['answer']}")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BundlerError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
