"""Progress off a terminal: a line at the start and one at the end, never carriage returns in a log."""

import subprocess
import sys

from tests.conftest import ROOT

CODE = """
from bundler.progress import bar
with bar(total=3 << 20, unit="B", unit_scale=True, desc="copying m.gguf") as b:
    for _ in range(3):
        b.update(1 << 20)
from bundler import manifest
"""


def test_progress_in_a_log_is_two_plain_lines(tmp_path):
    with open(tmp_path / "log", "w") as log:
        r = subprocess.run([sys.executable, "-c", CODE], stderr=log, cwd=ROOT)
    assert r.returncode == 0
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "copying m.gguf: started (3.0 MiB)" and lines[1].startswith("copying m.gguf: done, 3.0 MiB in ")
