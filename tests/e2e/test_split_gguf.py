"""A split GGUF (llama-gguf-split names) bundled part by part, verified, and served offline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bundler.manifest import sha256_file
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _split(src: Path, out: Path, parts: int) -> list[Path]:
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    per = -(-len(reader.tensors) // parts)
    out.mkdir(parents=True)
    copy_with_new_metadata(reader, gguf.GGUFWriter(str(out / "gemma-split.gguf"), arch, split_max_tensors=per), {},
                           [])
    return sorted(out.glob("gemma-split-*-of-*.gguf"))


def test_a_split_gguf_bundles_every_part_and_is_served_offline(bundle_dir, netns, tmp_path):
    files = _split(bundle_dir / "models/gemma-3-270m-q4_k_m.gguf", tmp_path / "split", 3)
    assert [f.name for f in files] == [f"gemma-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    spec = tmp_path / "split.toml"
    spec.write_text("\n".join([
        '[bundle]', 'name = "split-gguf"',
        '[[models]]', f'source = "{files[0]}"', f'sha256 = "{sha256_file(files[0])}"',
        *(f'[[models.parts]]\nfile = "{f.name}"\nsha256 = "{sha256_file(f)}"' for f in files[1:]),
        '[service]', 'port = 18120']) + "\n")
    r = subprocess.run([sys.executable, "-m", "bundler.cli", "bundle", str(spec), "--out", str(tmp_path / "dist")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    b = tmp_path / "dist" / "split-gguf"
    doc = json.loads((b / "manifest.json").read_text())
    m = doc["models"][0]
    assert m["name"] == "gemma-split" and m["file"] == "models/" + files[0].name
    assert [p["file"] for p in m["parts"]] == ["models/" + f.name for f in files[1:]]
    listed = {f["path"]: f["sha256"] for f in doc["files"]}
    for f in files:
        assert listed["models/" + f.name] == sha256_file(f)  # every part is in the signed manifest
    # the planner saw the whole model, not the first part
    assert m["facts"]["file_size"] == sum(f.stat().st_size for f in files)
    assert m["facts"]["layers"] == 18
    # `bundler inspect` of the first part reads the whole model too
    facts = json.loads(subprocess.run([sys.executable, "-m", "bundler.cli", "inspect", str(files[0])], cwd=ROOT,
                                      capture_output=True, text=True, check=True).stdout)
    assert facts["file_size"] == m["facts"]["file_size"]

    prefix = tmp_path / "p"
    r = netns.run([str(b / "install.sh"), "--prefix", str(prefix), "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert "Thursday" in out["answer"], out["answer"]  # the whole model answers: all its tensors were loaded
    stored = sorted(p.name for p in (prefix / "models" / m["sha256"]).iterdir())
    assert stored == [f.name for f in files]
    log = (prefix / "split-gguf" / "log" / "split-gguf.log").read_text()
    assert f"loading model '{prefix / 'models' / m['sha256'] / files[0].name}'" in log  # given the first part
    subprocess.run([out["ctl"], "stop"], check=True)

    # a part missing from the bundle is named before anything changes
    (b / m["parts"][1]["file"]).unlink()
    r = netns.run([str(b / "install.sh"), "--prefix", str(tmp_path / "p2"), "--json"])
    assert r.returncode == 1 and files[2].name in r.stderr
    assert not (tmp_path / "p2").exists()
