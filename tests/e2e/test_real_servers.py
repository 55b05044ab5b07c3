"""The paths users take, on real servers: `sudo ./install.sh --trust KEY` on a Debian whose PID 1
is systemd (first install, upgrade, rollback, uninstall), and minimal Debian 11, 12 and 13 roots
with nothing but python3. Each offline: only loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .boxes import SystemdBox, chroot_run, copy_root, debian_root

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent
NAME = "gemma3-270m-cpu"
UNIT = f"airgap-llm-{NAME}.service"


def _key_dir() -> str:
    return str(Path(os.environ["AIRGAP_LLM_TRUST"]).parent)


def _json(r) -> dict:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def systemd_root() -> Path:
    return debian_root("bookworm", "systemd,systemd-sysv,dbus,python3")


def test_systemd_first_install_upgrade_rollback_uninstall_as_root(bundle_dir, systemd_root, tmp_path):
    shutil.copy(HERE / "box_check.py", tmp_path / "box_check.py")
    binds = {str(bundle_dir): "/bundle", _key_dir(): "/keys", str(tmp_path): "/check"}
    with SystemdBox(systemd_root, binds) as box:
        before = box.sh("ls -a /opt /etc /var/cache /etc/systemd/system; getent passwd | cut -d: -f1").stdout
        install = ["/bundle/install.sh", "--trust", "/keys/signing-key.pub", "--json"]

        # first install, as the README says: as root, no --prefix
        out = _json(box.run(install))
        assert out["mode"] == "systemd" and out["stop_command"] == f"systemctl stop {UNIT}"
        assert out["api_key_file"] == f"/etc/airgap-llm/{NAME}.env"
        assert out["answer"]
        box.run(["sh", "-c", "cat > /root/first.json"], input=json.dumps(out))
        seen = json.loads(_json_line(box.run(["python3", "/check/box_check.py", "/root/first.json"])))
        assert seen["chat_status"] == 200 and seen["text"].strip()
        assert seen["no_key_status"] == 401 and seen["wrong_key_status"] == 401
        assert seen["key_file_mode"] == "0o600"
        [engine] = seen["engines"]
        assert engine["uid"] != 0, "the engine runs as root"
        assert engine["parallel"] == 4 and engine["binary"].startswith("/opt/airgap-llm/")
        rel1 = Path(out["release"]).name
        assert f"/releases/{rel1}/" in engine["binary"]

        # the unit is hardened, and its logs are where the output says
        sec = box.run(["systemd-analyze", "security", UNIT, "--no-pager"])
        exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout).group(1))
        assert exposure <= 2.0, sec.stdout[-3000:]
        logs = box.run([f"/opt/airgap-llm/{NAME}/current/bin/ctl", "logs"])
        assert logs.returncode == 0 and "llama" in logs.stdout.lower(), logs.stdout + logs.stderr

        # upgrade to another plan: the new release serves (its own command line), the old is kept
        up = _json(box.run([*install, "--concurrency", "2"]))
        rel2 = Path(up["release"]).name
        assert rel2 != rel1 and up["changed"]
        [engine] = json.loads(_json_line(box.run(["python3", "/check/box_check.py", "/root/first.json"])))["engines"]
        assert engine["parallel"] == 2 and f"/releases/{rel2}/" in engine["binary"] and engine["uid"] != 0
        again = _json(box.run([*install, "--concurrency", "2"]))
        assert again["changed"] is False

        # rollback: the first release serves again
        back = _json(box.run(["/bundle/install.sh", "--rollback", "--json"]))
        assert Path(back["release"]).name == rel1
        [engine] = json.loads(_json_line(box.run(["python3", "/check/box_check.py", "/root/first.json"])))["engines"]
        assert engine["parallel"] == 4 and f"/releases/{rel1}/" in engine["binary"]

        # uninstall --purge: the box as it was
        gone = box.run(["/bundle/install.sh", "--uninstall", "--purge"])
        assert gone.returncode == 0, gone.stderr
        assert box.run(["systemctl", "is-active", UNIT]).stdout.strip() in ("inactive", "unknown")
        assert json.loads(_json_line(box.run(["python3", "/check/box_check.py", "--engines"]))) == []
        after = box.sh("ls -a /opt /etc /var/cache /etc/systemd/system; getent passwd | cut -d: -f1").stdout
        assert after == before


def test_systemd_first_install_that_fails_leaves_no_unit_and_names_the_journal(bundle_dir, systemd_root, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 4096)  # a header llama-server cannot load
    doc = json.loads((bundle_dir / "manifest.json").read_text())
    (tmp_path / "facts.json").write_text(json.dumps(doc["models"][0]["facts"]))
    binds = {str(bundle_dir): "/bundle", _key_dir(): "/keys", str(tmp_path): "/data"}
    with SystemdBox(systemd_root, binds) as box:
        r = box.run(["/bundle/install.sh", "--trust", "/keys/signing-key.pub", "--model", "/data/broken.gguf",
                     "--model-facts", "/data/facts.json", "--timeout", "120"])
        assert r.returncode == 1
        assert "the engine stopped while starting" in r.stderr and f"journalctl -u {UNIT}" in r.stderr
        assert not box.run(["test", "-e", f"/etc/systemd/system/{UNIT}"]).returncode == 0
        assert box.run(["systemctl", "is-active", UNIT]).stdout.strip() != "active"
        assert not box.run(["test", "-e", f"/opt/airgap-llm/{NAME}/current"]).returncode == 0


def _json_line(r) -> str:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("suite", ["bullseye", "bookworm", "trixie"])
def test_minimal_debian_with_only_python3_installs_and_answers_as_root(bundle_dir, tmp_path, suite):
    """Debian 11 (Python 3.9, no distutils), 12 and 13 as debootstrap --variant=minbase makes them:
    no pip, no venv module, no compiler, no systemd running. The README's command as root."""
    root = copy_root(debian_root(suite), tmp_path / "root")
    shutil.copy(HERE / "box_check.py", root / "tmp" / "box_check.py")
    log = f"/opt/airgap-llm/{NAME}/log/{NAME}.log"
    script = ("/bundle/install.sh --trust /keys/signing-key.pub --json > /tmp/out.json && "
              "python3 /tmp/box_check.py /tmp/out.json > /tmp/seen.json && "
              f"/opt/airgap-llm/{NAME}/current/bin/ctl stop && stat -c %A {log} > /tmp/logmode && "
              "python3 -c 'import json; print(json.dumps({\"seen\": json.load(open(\"/tmp/seen.json\")), "
              "\"out\": json.load(open(\"/tmp/out.json\")), \"log\": open(\"/tmp/logmode\").read().strip()}))'")
    r = chroot_run(root, {str(bundle_dir): "/bundle", _key_dir(): "/keys"}, script)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    seen, out = got["seen"], got["out"]
    assert seen["chat_status"] == 200 and seen["text"].strip() and seen["no_key_status"] == 401
    [engine] = seen["engines"]
    assert engine["uid"] != 0, "the engine runs as root"
    assert out["mode"] == "process" and out["user"] == "airgap-llm"
    assert got["log"] == "-rw-r-----"  # the log is readable by root alone


EMBED_CHECK = """
import json, sys, urllib.error, urllib.request as u
key = open(sys.argv[1]).read().split("LLAMA_API_KEY=")[1].split()[0]
def post(url, body, k):
    r = u.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
                  **({"Authorization": "Bearer " + k} if k else {})})
    try:
        with u.build_opener(u.ProxyHandler({})).open(r, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, None
e = post("http://127.0.0.1:%d/v1/embeddings", {"model": "embed", "input": ["a", "b"]}, key)
c = post("http://127.0.0.1:%d/v1/chat/completions", {"model": "chat", "max_tokens": 4,
         "messages": [{"role": "user", "content": "Hi"}]}, key)
print(json.dumps({"embed": e[0], "dims": [len(d["embedding"]) for d in e[1]["data"]] if e[1] else [],
                  "embed_no_key": post("http://127.0.0.1:%d/v1/embeddings", {"input": "a"}, None)[0],
                  "chat": c[0], "chat_no_key": post("http://127.0.0.1:%d/v1/chat/completions", {}, None)[0]}))
"""


def test_systemd_serves_a_chat_and_an_embedding_model_as_one_hardened_unit(two_model_bundle_dir, systemd_root,
                                                                         tmp_path):
    """Two models, two engines, one unit (DynamicUser, the same hardening), one key: as root on systemd."""
    from .conftest import TWO_MODELS

    (_, chat), (_, embed) = TWO_MODELS
    (tmp_path / "check.py").write_text(EMBED_CHECK % (embed, chat, embed, chat))
    unit = "airgap-llm-chat-and-embed.service"
    binds = {str(two_model_bundle_dir): "/bundle", _key_dir(): "/keys", str(tmp_path): "/check"}
    with SystemdBox(systemd_root, binds) as box:
        out = _json(box.run(["/bundle/install.sh", "--trust", "/keys/signing-key.pub", "--json"]))
        assert out["mode"] == "systemd" and [m["task"] for m in out["models"]] == ["chat", "embed"]
        seen = json.loads(_json_line(box.run(["python3", "/check/check.py", "/etc/airgap-llm/chat-and-embed.env"])))
        assert seen == {"embed": 200, "dims": [640, 640], "embed_no_key": 401, "chat": 200, "chat_no_key": 401}
        shutil.copy(HERE / "box_check.py", tmp_path / "box_check.py")
        engines = json.loads(_json_line(box.run(["python3", "/check/box_check.py", "--engines"])))
        assert len(engines) == 2 and all(e["uid"] != 0 for e in engines)  # both engines, neither as root
        assert {e["parallel"] for e in engines} == {2}
        sec = box.run(["systemd-analyze", "security", unit, "--no-pager"])
        assert float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout).group(1)) <= 2.0
        gone = box.run(["/bundle/install.sh", "--uninstall", "--purge"])
        assert gone.returncode == 0, gone.stderr
