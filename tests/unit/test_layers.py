"""The layers the code keeps (tools/check_layers.py, run by `make lint`): the box never imports the
bundle side, the contract imports nothing of ours; and the box's entry point loads without any of
the bundling side's third-party packages."""

import importlib.util
import shutil
import subprocess
import sys

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers)


def test_the_tree_keeps_its_layers():
    assert layers.problems() == []


def _lint(tree):
    """tools/check_layers.py as make lint runs it, on another tree."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py"), str(tree)], capture_output=True,
                          text=True)


def _copy(tmp_path):
    dst = tmp_path / "tree"
    shutil.copytree(ROOT / "bundler", dst / "bundler", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _planted(tmp_path, rel, code):
    """A copy of the package with `code` appended to bundler/REL."""
    tree = _copy(tmp_path)
    f = tree / "bundler" / rel
    f.write_text(f.read_text() + code)
    return tree


def test_a_planted_bundle_side_import_fails_make_lint(tmp_path):
    """An import of the bundle side from the box, even one deferred into a function, fails the check
    (and so `make lint`), naming the line and how the box reaches it."""
    tree = _planted(tmp_path, "box/health.py", "\n\ndef _planted():\n    from .. import spec  # noqa: F401\n")
    found = layers.problems(tree)
    assert len(found) == 1 and "bundler/box/health.py:" in found[0] and "bundler.spec" in found[0], found
    r = _lint(tree)
    assert r.returncode == 1 and "bundler.spec" in r.stderr
    # reached through another module (a core module that starts importing the bundle side) counts too
    tree = _copy(tmp_path / "2")
    mi = tree / "bundler" / "modelinfo.py"
    mi.write_text(mi.read_text() + "\n\ndef _planted():\n    from .lock import pins  # noqa: F401\n")
    found = layers.problems(tree)
    assert found and "bundler.lock" in found[0] and "modelinfo.py" in found[0]
    # and the contract may import nothing of ours
    tree = _copy(tmp_path / "3")
    tr = tree / "bundler" / "contract" / "trust.py"
    tr.write_text(tr.read_text() + "\nfrom ..errors import BundlerError  # noqa: E402,F401\n")
    assert any("the contract imports bundler.errors" in p for p in layers.problems(tree))


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'requests', 'piptools', 'huggingface_hub', 'cryptography', 'gguf', 'uv', 'pip',
                                  'matplotlib', 'tomli', 'setuptools'}:
            raise ImportError('the box has no ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib, bundler
names = []
for m in pkgutil.walk_packages(bundler.__path__, 'bundler.'):
    if m.name.startswith(('bundler.box', 'bundler.contract', 'bundler.engines.tabby_run', 'bundler.engines.vllm_auth',
                          'bundler.supervise', 'bundler.guard', 'bundler.egress', 'bundler.planner')) or \\
            m.name in ('bundler.engines.llama_cpp', 'bundler.engines.vllm', 'bundler.engines.exllama'):
        if m.name.endswith('__main__'):
            continue
        importlib.import_module(m.name)
        names.append(m.name)
from bundler.box.main import main
print(len(names))
"""


def test_the_box_side_loads_without_the_bundling_sides_packages():
    r = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 20


def test_both_commands_say_their_version():
    from bundler import __version__

    r = subprocess.run([sys.executable, "-m", "bundler", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"airgap-llm bundler {__version__}"
    r = subprocess.run([sys.executable, "-m", "bundler.box", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"airgap-llm installer {__version__}"


def test_bundling_without_the_bundle_extra_says_which_packages_and_how():
    """After a plain `pip install -e .`, `bundler bundle` failed with a hint blaming the package index."""
    code = ("import importlib.abc, sys\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('piptools', 'huggingface_hub'): raise ImportError(name)\n"
            "sys.meta_path.insert(0, B())\n"
            "import importlib.util\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n in ('piptools', 'huggingface_hub') else real(n, *a)\n"
            "from bundler.cli import main\n"
            "sys.exit(main(['bundle', 'bundle.toml', '--out', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, "/nonexistent-out"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "pip-tools, huggingface_hub" in r.stderr and ".[bundle]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_core_and_box_ask_engines_their_capabilities():
    """Engine facts live in each engine package (engines.base.Engine); the box reads them from the registry
    instead of comparing names (which guarded routes, whose kernels need a C compiler, who starts slowly)."""
    from bundler import engines, spec
    from bundler.box.preflight import TRITON_ENGINES

    reg = engines.registry()
    assert sorted(reg) == ["exllamav2", "exllamav3", "llama.cpp", "vllm"]
    assert set(TRITON_ENGINES) == {"vllm", "exllamav3"}
    assert {f for e in reg.values() for f in e.formats} == set(spec.FORMATS)
    assert all(e.guarded and e.reference and e.label for e in reg.values())
    assert [n for n, e in reg.items() if e.tp_retry] == ["vllm"]
    import pytest

    from bundler.errors import BundlerError

    with pytest.raises(BundlerError, match="no engine named"):
        engines.get("ollama")


def test_an_engine_name_outside_the_engines_fails_make_lint(tmp_path):
    """One place per fact: code outside bundler/engines/ asks an engine's capabilities; a planted
    `plan.engine == "vllm"` in the box's tuner fails the check, naming the line."""
    assert layers.engine_names() >= {"llama.cpp", "vllm", "exllamav2", "exllamav3"}
    assert layers.engine_name_uses() == []
    tree = _planted(tmp_path, "box/tune.py", '\n\ndef _planted(plan):\n    return plan.engine == "vllm"\n')
    found = layers.engine_name_uses(tree)
    assert len(found) == 1 and "bundler/box/tune.py:" in found[0] and "'vllm'" in found[0], found
    r = _lint(tree)
    assert r.returncode == 1 and "the engine name 'vllm'" in r.stderr


def test_an_engines_launch_side_importing_its_build_side_fails_make_lint(tmp_path):
    """Any engine package, a new one too: its __init__ (the box side) never imports its build.py."""
    tree = _planted(tmp_path, "engines/vllm/__init__.py",
                    "\n\ndef _planted():\n    from .build import lock_for_box  # noqa: F401\n")
    found = layers.problems(tree)
    assert len(found) == 1 and "bundler.engines.vllm.build" in found[0], found
