"""Issue #15: on a box without a C compiler or Python headers, Triton (vLLM's kernels) builds each
kernel's launcher with the release's bin/cc: Zig's clang from the bundle and the bundle's Python
headers. Here that wrapper builds a Python extension exactly as Triton calls its compiler (the
box's own include folder missing, a library named by file as -l:libcuda.so.1 is on a GPU box),
and the extension imports and runs."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bundler.toolchains import zig_toolchain
from bundler.render import render

pytestmark = pytest.mark.e2e

EXT = r"""
#include <Python.h>
int answer(void);
static PyObject *ask(PyObject *self, PyObject *arg) { return PyLong_FromLong(answer() + PyLong_AsLong(arg)); }
static PyMethodDef methods[] = {{"ask", ask, METH_O, ""}, {0}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "launcher", 0, -1, methods};
PyMODINIT_FUNC PyInit_launcher(void) { return PyModule_Create(&mod); }
"""


def _triton_build(cc: str, src: Path, out: Path, libdir: Path) -> subprocess.CompletedProcess:
    # triton/runtime/build.py's command line, a box without Python headers: its include dir is missing
    return subprocess.run([cc, str(src), "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", str(out),
                           "-l:libanswer.so.1", f"-L{libdir}", f"-I{libdir / 'include'}", "-I/nonexistent/python3"],
                          capture_output=True, text=True)


def test_the_bundled_compiler_builds_a_launcher_that_imports(tmp_path):
    zig_root, _ = zig_toolchain()
    zig = str(zig_root / "zig")
    libdir = tmp_path / "driver"  # stands for the NVIDIA driver's folder holding libcuda.so.1
    libdir.mkdir()
    (tmp_path / "answer.c").write_text("int answer(void) { return 42; }\n")
    subprocess.run([zig, "cc", "-shared", "-fPIC", "-o", str(libdir / "libanswer.so.1"), str(tmp_path / "answer.c"),
                    "-Wl,-soname,libanswer.so.1"], check=True)
    headers = tmp_path / "release" / "include"  # the bundle's copy of the Python headers
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copytree(sysconfig.get_paths()["include"], headers / py)
    assert (headers / py / "Python.h").is_file()
    cc = tmp_path / "release" / "cc"
    cc.write_text(render("cc.sh.j2", {"what": "test", "compiler": [zig, "cc"],
                                      "includes": [str(headers / py), str(headers)]}))
    cc.chmod(0o755)
    src = tmp_path / "launcher.c"
    src.write_text(EXT)

    so = tmp_path / "launcher.so"
    r = _triton_build(str(cc), src, so, libdir)
    assert r.returncode == 0, r.stderr
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
    assert "libanswer.so.1" in needed  # the library named by file is linked
    r = subprocess.run([sys.executable, "-c", f"import importlib.util as u; s = u.spec_from_file_location("
                        f"'launcher', {str(so)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
                        "print(m.ask(1))"], capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(libdir)})
    assert r.stdout.strip() == "43", r.stderr


def test_the_bundle_carries_the_box_pythons_headers_when_this_machine_has_that_python(tmp_path):
    """The headers come from a python of the box's version here (the running one, one on PATH or in
    pyenv), checked by compiling Python.h; for a version this machine lacks, none, and it says so."""
    from types import SimpleNamespace

    from bundler.bundle import _python_headers
    from bundler.engines.vllm.build import VllmSpec
    from bundler.spec import Spec

    spec = Spec(path="s.toml", name="t", version="1", models=(), engines={"vllm": VllmSpec(version="0.26.0")})
    said = []
    here = f"{sys.version_info.major}.{sys.version_info.minor}.9"
    edir = tmp_path / "engines" / "exllamav3"  # vLLM's and ExLlamaV3's bundles each carry them
    got = _python_headers(spec, SimpleNamespace(python=here, arch="x86_64"), edir, said.append)
    assert got == "engines/exllamav3/include"
    assert (edir / "include" / f"python{here.rsplit('.', 1)[0]}" / "Python.h").is_file()
    assert any("headers from" in s for s in said)
    assert _python_headers(spec, SimpleNamespace(python="3.99.0", arch="x86_64"), tmp_path / "b", said.append) == ""
    assert "no headers of Python 3.99 here" in said[-1] and "python_headers" in said[-1]
