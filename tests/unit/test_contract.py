"""The bundle document's one schema (bundler/contract/bundle.py), checked where the bundler writes it
and where the installer reads it: a manifest from another version names the key it lacks."""

import copy
import json

import pytest

from bundler.contract.bundle import SCHEMA, BundleDoc, ContractError
from bundler.errors import BundlerError

DOC = {
    "schema": SCHEMA, "name": "b", "version": "1.0.0", "pythons": ["3.11"], "target": None,
    "service": {"host": "127.0.0.1", "port": 8080, "concurrency": 4, "context": 4096},
    "models": [{"name": "m", "format": "gguf", "file": "models/m.gguf", "sha256": "a" * 64, "source": "./m.gguf",
                "task": "chat", "port": 0, "facts": {"format": "gguf"}, "parts": []}],
    "engines": [{"name": "llama.cpp", "backend": "cpu", "dir": "engines/llama.cpp-cpu", "arch": "x86_64",
                 "glibc": "2.28", "cpu_variants": ["x64"]}],
    "files": [],
}


def test_a_manifest_as_the_bundler_writes_it_reads_typed():
    d = BundleDoc.from_json(DOC)
    assert d.models[0].facts == {"format": "gguf"} and d.engines[0].glibc == "2.28"
    assert d.engines[0].fields["cpu_variants"] == ["x64"]  # the engine's own keys travel with its entry
    assert d.service.port == 8080 and d.target is None


@pytest.mark.parametrize("change, says", [
    (lambda d: d["engines"][0].pop("glibc"), "engines[0].glibc is missing"),
    (lambda d: d["models"][0].pop("facts"), "models[0].facts is missing"),
    (lambda d: d["service"].update(port="8080"), "service.port is str '8080', not int"),
    (lambda d: d.update(schema=2), "schema is 2, this installer reads schema 1"),
    (lambda d: d.update(models=[]), "models is empty"),
    (lambda d: d["models"][0].update(on_box="yes"), "models[0].on_box is str"),
])
def test_what_another_version_wrote_is_named_by_its_key(change, says):
    d = copy.deepcopy(DOC)
    change(d)
    with pytest.raises(ContractError) as e:
        BundleDoc.from_json(d)
    assert says in str(e.value)


def test_the_installer_refuses_such_a_manifest_before_it_plans(tmp_path):
    from bundler.box import boot

    d = copy.deepcopy(DOC)
    d["engines"][0].pop("arch")
    d["airgap_llm"] = "0.0.9"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundlerError) as e:
        boot.manifest(tmp_path)
    assert "engines[0].arch is missing" in e.value.message and "nothing was changed" in e.value.message
    assert "0.0.9" in e.value.hint
    (tmp_path / "manifest.json").write_text(json.dumps(DOC))
    assert boot.manifest(tmp_path)[0]["name"] == "b"


def test_a_delta_names_its_base_by_hash_and_only_files_the_manifest_lists():
    d = copy.deepcopy(DOC)
    d["files"] = [{"path": "models/m.gguf", "size": 1, "sha256": "a" * 64}]
    d["delta"] = {"base": {"name": "b", "version": "1.0.0", "manifest_sha256": "b" * 64},
                  "from_base": ["models/m.gguf"]}
    assert BundleDoc.from_json(d).delta.from_base == ("models/m.gguf",)
    d["delta"]["from_base"] = ["../../etc/passwd"]
    with pytest.raises(ContractError, match="which the manifest does not list"):
        BundleDoc.from_json(d)
    d["delta"] = {"base": {"name": "b", "version": "1", "manifest_sha256": "nope"}, "from_base": []}
    with pytest.raises(ContractError, match="not a sha256"):
        BundleDoc.from_json(d)


def test_a_delta_whose_paths_are_unsafe_writes_nothing_before_verification_names_them(tmp_path):
    """Filling in a delta is the first write into the bundle folder: a manifest path that leaves the folder
    (only possible when the installer runs without bootstrap's signature check) is left to verification."""
    from bundler.box.delta import fill_from_base

    outside = tmp_path / "outside" / "victim.conf"
    d = copy.deepcopy(DOC)
    d["files"] = [{"path": str(outside), "size": 3, "sha256": "a" * 64}]
    d["delta"] = {"base": {"name": "b", "version": "1", "manifest_sha256": "b" * 64}, "from_base": [str(outside)]}
    (tmp_path / "bundle").mkdir()
    assert fill_from_base(tmp_path / "bundle", d, tmp_path / "base") == set()
    assert not outside.parent.exists()
