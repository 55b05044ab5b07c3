"""Every entry point meets random, truncated and wrongly typed input with an `error:` line naming what
to fix and an exit code, never a traceback (issue 24: 17 of 30 ordinary mistakes ended in one), and
writes nothing half-done. The bundler's commands run in this process (fast); the unpacker's fuzz is in
test_safetar.py, install.sh's start in tests/e2e."""

import json
import random

import pytest

from bundler import cli
from bundler.box import options
from tests.conftest import ROOT

PROBE = json.loads((ROOT / "tests/data/boxes/device-h200x2-probe.json").read_text())
SPEC = (ROOT / "bundle.toml").read_text()


def _mutations(rng: random.Random, good: bytes) -> list[bytes]:
    """Truncated, bytes flipped, empty, binary noise, and the JSON/TOML of another type."""
    out = [b"", good[: rng.randrange(1, len(good))], bytes(rng.randrange(256) for _ in range(200))]
    flipped = bytearray(good)
    for _ in range(5):
        i = rng.randrange(len(flipped))
        flipped[i] = rng.randrange(32, 127)
    out.append(bytes(flipped))
    return out


def _typed_probes(rng: random.Random) -> list[bytes]:
    out = []
    for key in ("cpus", "ram_total", "glibc", "gpus", "cpu_flags", "systemd_pid1", "installed", "python"):
        for bad in ("many", -1, None, [1, 2], {"a": 1}, 3.5, True):
            d = dict(PROBE)
            d[key] = bad
            out.append(json.dumps(d).encode())
    d = dict(PROBE)
    d["gpus"] = [dict(PROBE["gpus"][0], memory_total_mib="lots")]
    out.append(json.dumps(d).encode())
    out.append(json.dumps([PROBE]).encode())
    rng.shuffle(out)
    return out


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: a usage error is exit 2 with its own message
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def test_the_bundlers_commands_never_show_a_traceback(tmp_path, capsys):
    rng = random.Random(24)
    cases = 0
    bad_files = _mutations(rng, json.dumps(PROBE).encode()) + _typed_probes(rng)
    for i, data in enumerate(bad_files):
        f = tmp_path / f"probe{i}.json"
        f.write_bytes(data)
        for argv in (["plan", "--box", str(f), "--model", str(ROOT / "tests/data/models/Llama-3.1-8B-Instruct")],
                     ["check", "--offline", str(ROOT / "docs/device/gpu-box-exl2.toml"), "--target", str(f),
                      "--reuse-installed"]):
            rc, err = _run(argv, capsys)
            cases += 1
            assert rc in (0, 1, 2, 3), (argv, rc, err)
            assert "Traceback" not in err and "this is a bug" not in err, (data[:200], err)
            if rc:
                assert "error:" in err, err
    typed = [SPEC.replace("8080", '"x"'), SPEC.replace("concurrency = 4", "concurrency = -5"),
             SPEC.replace('version = "1.0.0"', "version = 1"), SPEC.replace("[[models]]", "[models]")]
    for i, data in enumerate(_mutations(rng, SPEC.encode()) + [t.encode() for t in typed]):
        f = tmp_path / f"spec{i}.toml"
        f.write_bytes(data)
        rc, err = _run(["check", "--offline", str(f)], capsys)
        cases += 1
        assert rc in (0, 1, 2) and "Traceback" not in err and "this is a bug" not in err, err
        assert rc == 0 or "error:" in err, err  # a flip inside a comment leaves a valid spec
    for argv in (["verify", str(tmp_path / "missing")], ["unpack", str(tmp_path / "spec0.toml"), str(tmp_path / "o")],
                 ["verify", str(tmp_path / "spec1.toml")], ["inspect", str(tmp_path / "spec2.toml")],
                 ["inspect", str(tmp_path / "missing.gguf")],
                 ["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-file", str(tmp_path / "nokey")],
                 ["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--concurrency", "0"],
                 ["plan", "--gpus", "lots", "--model", str(ROOT / "tests/data/models/Llama-3.1-8B-Instruct")],
                 ["plan", "--concurrency", "0", "--model", str(ROOT / "tests/data/models/Llama-3.1-8B-Instruct")],
                 ["plan", "--context", "-4", "--model", str(ROOT / "tests/data/models/Llama-3.1-8B-Instruct")]):
        rc, err = _run(argv, capsys)
        cases += 1
        assert rc in (1, 2, 3) and "error" in err and "Traceback" not in err and "this is a bug" not in err, (argv,
                                                                                                             err)
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert cases > 100


@pytest.mark.parametrize("seed", range(3))
def test_install_sh_options_refuse_nonsense_with_a_usage_error(seed, capsys):
    rng = random.Random(seed)
    words = ["--port", "--concurrency", "--context", "--tensor-parallel", "--bench-levels", "--tune-budget", "--box",
             "--prefix", "--dry-run", "--purge", "--baseline", "--user", "--list", "--uninstall", "--rollback"]
    values = ["0", "-5", "100000", "abc", "", "1,x", "99999999999999999999", "root", "1.5"]
    for _ in range(60):
        argv = ["--bundle", "/b"]
        for _ in range(rng.randint(1, 4)):
            argv.append(rng.choice(words))
            if rng.random() < 0.7:
                argv.append(rng.choice(values))
        try:
            options.parse(argv)
            continue  # a valid combination
        except SystemExit as e:
            assert e.code == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, (argv, err)
