from pathlib import Path

from bundler.probe import parse_gpu_csv, parse_topo

DATA = Path(__file__).resolve().parents[1] / "data" / "gpu"


def test_real_h200x2_query_output_parses():
    gpus = parse_gpu_csv((DATA / "h200x2" / "nvidia-smi-query.csv").read_text())
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA H200"
    assert gpus[0].memory_total_mib == 143771 and gpus[0].memory_free_mib == 143156
    assert gpus[0].compute_capability == "9.0" and gpus[0].driver == "580.159.04"


def test_real_h200x4_query_output_parses():
    gpus = parse_gpu_csv((DATA / "h200x4" / "nvidia-smi-query.csv").read_text())
    assert len(gpus) == 4 and all(g.name == "NVIDIA H200" for g in gpus)


def test_noheader_nounits_output_parses_in_query_order():
    text = "0, NVIDIA GeForce RTX 3090, 24576, 24000, 8.6, 550.54.14\n"
    (g,) = parse_gpu_csv(text)
    assert (g.name, g.memory_total_mib, g.compute_capability, g.driver) == ("NVIDIA GeForce RTX 3090", 24576, "8.6",
                                                                            "550.54.14")


def test_no_gpus_means_empty():
    assert parse_gpu_csv("") == []


def test_topology_of_real_nvlinked_boxes_and_a_pcie_box():
    assert parse_topo((DATA / "h200x2" / "nvidia-smi-topo.txt").read_text()) == "nvlink"
    assert parse_topo((DATA / "h200x4" / "nvidia-smi-topo.txt").read_text()) == "nvlink"
    pcie = ("\tGPU0\tGPU1\tCPU Affinity\n"
            "GPU0\t X \tPHB\t0-15\n"
            "GPU1\tPHB\t X \t0-15\n")
    assert parse_topo(pcie) == "pcie"


def test_topology_with_terminal_underline_codes_as_seen_on_the_device():
    text = ("\t\x1b[4mGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
            "GPU0\t X \tNV18\t0-31\t0\t\tN/A\n"
            "GPU1\tNV18\t X \t0-31\t0\t\tN/A\n")
    assert parse_topo(text) == "nvlink"


def _fake_smi(tmp_path, box):
    """An nvidia-smi on PATH that prints a recorded box's output, as the probe asks it."""
    d = DATA / box
    topo, query = d / "nvidia-smi-topo.txt", d / "nvidia-smi-query.csv"
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncase \"$1\" in topo) cat '{topo}' 2>/dev/null ;; *) cat '{query}' ;; esac\n")
    script.chmod(0o755)
    return tmp_path


def test_probe_reads_gpus_and_links_through_nvidia_smi(tmp_path, monkeypatch):
    from bundler import probe

    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path, 'a100x8-nvlink')}:/usr/bin:/bin")
    hw = probe.probe(tmp_path)
    assert hw.gpu_source == "nvidia-smi"  # no NVML library on this machine
    assert len(hw.gpus) == 8 and hw.gpus[7].name == "NVIDIA A100-SXM4-80GB" and hw.gpus[0].memory_total_mib == 81920
    assert hw.gpu_links == "nvlink"


def test_probe_of_a_pcie_box_an_old_driver_and_a_box_without_nvidia_smi(tmp_path, monkeypatch):
    from bundler import probe

    (tmp_path / "a").mkdir()
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path / 'a', 'rtx4090x4-pcie')}:/usr/bin:/bin")
    hw = probe.probe(tmp_path)
    assert [g.compute_capability for g in hw.gpus] == ["8.9"] * 4 and hw.gpu_links == "pcie"

    (tmp_path / "b").mkdir()
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path / 'b', 'old-driver-v100x2')}:/usr/bin:/bin")
    hw = probe.probe(tmp_path)
    assert hw.gpus[0].driver == "470.256.02" and hw.gpu_links == "nvlink"

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    hw = probe.probe(tmp_path)
    assert hw.gpus == () and hw.gpu_source == "" and hw.gpu_links == ""


def test_single_rtx3090_output():
    (g,) = parse_gpu_csv((DATA / "rtx3090x1" / "nvidia-smi-query.csv").read_text())
    assert (g.name, g.memory_total_mib, g.compute_capability) == ("NVIDIA GeForce RTX 3090", 24576, "8.6")


def test_a_venvs_packages_are_seen_when_the_installer_runs_without_site(tmp_path):
    """The GPU boxes' python is a venv (/opt/torch/.venv) holding torch. The installer runs it with -I -S, and
    without site.py a venv's python reports the base install's site-packages: the probe saw no torch, and
    every bundle that reuses the box's torch was refused there (found on the H100, session 10)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "boxtorch-2.11.0.dist-info").mkdir()
    (site / "boxtorch-2.11.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: boxtorch\n"
                                                                  "Version: 2.11.0\n")
    # and nothing of the venv runs: site.py would run a .pth file's code, as root in the installer
    marker = tmp_path / "pth-ran"
    (site / "zz.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bundler import probe; "
            "print(probe.installed_distributions(probe._site_packages()).get('boxtorch'))")
    out = subprocess.run([str(venv / "bin" / "python"), "-I", "-S", "-c", code], capture_output=True, text=True,
                         cwd="/")
    assert out.stdout.strip() == "2.11.0", out.stdout + out.stderr
    assert not marker.exists()


def test_distributions_are_read_from_folder_names_so_no_file_of_the_box_is_opened_as_root(tmp_path):
    """A METADATA that is a FIFO hung the root installer; one that links elsewhere was read as root; one not
    in UTF-8 crashed it. The names and versions come from the dist-info folders' names alone."""
    import os

    from bundler.probe import installed_distributions

    site = tmp_path / "site-packages"
    (site / "torch-2.11.0+cu130.dist-info").mkdir(parents=True)
    os.mkfifo(site / "torch-2.11.0+cu130.dist-info" / "METADATA")
    (site / "Secret_Pkg-1.0.dist-info").mkdir()
    (site / "Secret_Pkg-1.0.dist-info" / "METADATA").symlink_to("/etc/shadow")
    (site / "odd-2.0-py3.12.egg-info").mkdir()
    (site / "odd-2.0-py3.12.egg-info" / "PKG-INFO").write_bytes(b"\xff\xfe not utf-8")
    (site / "not_a_dist").mkdir()
    assert installed_distributions((str(site), str(tmp_path / "missing"))) == {
        "odd": "2.0", "secret-pkg": "1.0", "torch": "2.11.0+cu130"}


def test_a_package_with_two_versions_in_one_folder_counts_as_absent_so_it_is_never_reused(tmp_path):
    """Found by review: two dist-info folders of one package in one site-packages (an uninstall stopped
    half-way) reported whichever sorted first, and a lock could reuse files that are another version. Such
    a package is now absent (the bundle carries its own); a later folder cannot stand in for it either,
    since import would find the first folder's files."""
    from bundler.probe import installed_distributions

    site, base = tmp_path / "venv-site", tmp_path / "base-site"
    for v in ("12.8.4.1", "12.9.1.4"):
        (site / f"nvidia_cublas_cu12-{v}.dist-info").mkdir(parents=True)
    (site / "numpy-2.3.5.dist-info").mkdir()
    (base / "nvidia_cublas_cu12-12.8.4.1.dist-info").mkdir(parents=True)
    (base / "numpy-1.26.4.dist-info").mkdir()
    assert installed_distributions((str(site), str(base))) == {"numpy": "2.3.5"}
