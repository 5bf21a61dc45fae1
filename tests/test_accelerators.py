"""The accelerator extra a machine needs (faked nvidia-smi outputs and TPU probes), the start-up
device report with a faked device list, and the notebook's install cell outside Colab."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest

from meshlm import accelerators as acc
from meshlm.accelerators import Choice, SystemProbe

REPO = pathlib.Path(__file__).parents[1]


def _smi(driver: str, cuda: str | None) -> str:
    """nvidia-smi's header as its releases print it (older ones lack the CUDA field)."""
    tail = f"     CUDA Version: {cuda}     |" if cuda else ""
    return (f"| NVIDIA-SMI {driver}             Driver Version: {driver}{tail}\n"
            "|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |\n")


@pytest.mark.parametrize("smi, extra", [
    (_smi("580.159.04", "13.0"), "cuda13"),  # the GPU machine's header
    (_smi("590.10", "13.1"), "cuda13"),
    (_smi("550.54.15", "12.4"), "cuda12"),
    (_smi("575.51.03", "12.9"), "cuda12"),
    (_smi("580.65.06", None), "cuda13"),  # no CUDA field: from the driver version
    (_smi("535.104.05", None), "cuda12"),
    (_smi("470.82.01", "11.4"), "cpu"),  # too old for JAX's CUDA 12 plugin
    (_smi("470.82.01", None), "cpu"),
    (None, "cpu"),  # no nvidia-smi
])
def test_extra_from_nvidia_smi(smi, extra):
    choice = acc.select_extra(SystemProbe(nvidia_smi=smi), environ={})
    assert choice.extra == extra, choice
    if smi and extra == "cpu":
        assert "too old" in choice.reason


def test_cuda_version_parses_the_header():
    assert acc.cuda_version(_smi("580.159.04", "13.0")) == (13, 0)
    assert acc.cuda_version(_smi("550.54.15", "12.4")) == (12, 4)
    assert acc.cuda_version("no such fields") is None


def _pci(root: pathlib.Path, slot: str, vendor: str, device: str) -> None:
    d = root / "sys/bus/pci/devices" / slot
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_tpu_chips_on_pci(tmp_path):
    _pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC: not a TPU
    probe = acc.probe_system(root=str(tmp_path), environ={}, nvidia_smi=lambda: None)
    assert probe == SystemProbe(None, None)
    for i in range(4):
        _pci(tmp_path, f"0000:00:0{5 + i}.0", "0x1ae0", "0x0063")  # v5e
    _pci(tmp_path, "0000:00:0a.0", "0x10de", "0x0063")  # another vendor's device
    probe = acc.probe_system(root=str(tmp_path), environ={}, nvidia_smi=lambda: None)
    assert probe.tpu == "4 TPU chips on PCI"
    assert acc.select_extra(probe, environ={}) == Choice("tpu", "a TPU (4 TPU chips on PCI)")


def test_tpu_device_files_and_runtime_variable(tmp_path):
    (tmp_path / "dev").mkdir()
    probe = acc.probe_system(root=str(tmp_path), environ={"TPU_ACCELERATOR_TYPE": "v4-8"},
                             nvidia_smi=lambda: None)
    assert probe.tpu == "TPU_ACCELERATOR_TYPE=v4-8"
    (tmp_path / "dev/accel0").touch()
    probe = acc.probe_system(root=str(tmp_path), environ={}, nvidia_smi=lambda: None)
    assert probe.tpu == "1 TPU device file (/dev/accel*)"
    assert acc.detect_extra(probe).extra == "tpu"


def test_tpu_wins_over_a_gpu_and_the_variable_over_both():
    probe = SystemProbe(nvidia_smi=_smi("580.159.04", "13.0"), tpu="8 TPU chips on PCI")
    assert acc.select_extra(probe, environ={}).extra == "tpu"
    assert acc.select_extra(probe, environ={"MESHLM_ACCEL": "cpu"}) == Choice(
        "cpu", "MESHLM_ACCEL=cpu")
    assert acc.select_extra(SystemProbe(), environ={"MESHLM_ACCEL": ""}).extra == "cpu"


def test_invalid_variable_is_one_clear_line(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"MESHLM_ACCEL='gpu' is not one of cpu, cuda12, "
                                         r"cuda13, tpu"):
        acc.select_extra(SystemProbe(), environ={"MESHLM_ACCEL": "gpu"})
    monkeypatch.setenv("MESHLM_ACCEL", "gpu")
    monkeypatch.setattr(acc, "probe_system", lambda: SystemProbe())
    assert acc.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: MESHLM_ACCEL='gpu'")


def test_command_line_prints_the_extra_and_imports_no_jax(monkeypatch, capsys):
    monkeypatch.setattr(acc, "probe_system",
                        lambda: SystemProbe(nvidia_smi=_smi("550.54.15", "12.4")))
    monkeypatch.delenv("MESHLM_ACCEL", raising=False)
    assert acc.main([]) == 0 and capsys.readouterr().out == "cuda12\n"
    assert acc.main(["--why"]) == 0
    assert capsys.readouterr().out == "cuda12: an NVIDIA GPU (driver 550.54.15, CUDA 12.4)\n"
    assert acc.main(["--foreign", "cuda13"]) == 0
    assert capsys.readouterr().out.split() == ["jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu"]
    # make runs it before JAX is installed: the module needs the standard library only.
    code = "import sys, meshlm.accelerators; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"PYTHONPATH": str(REPO / "src")})
    assert done.stdout == "[]\n", done


def _devices(n, platform, kind, processes=1):
    return [SimpleNamespace(platform=platform, device_kind=kind, process_index=i % processes)
            for i in range(n)]


def _no_probe():
    raise AssertionError("the system is probed only when JAX sees only the CPU")


def test_report_lists_the_devices():
    gpus = _devices(8, "gpu", "NVIDIA H100 80GB HBM3")
    assert acc.startup_report(gpus, _no_probe, environ={}) == [
        "devices: 8 x NVIDIA H100 80GB HBM3 (gpu) in 1 process"]
    tpus = _devices(32, "tpu", "TPU v5 lite", processes=4)
    assert acc.startup_report(tpus, _no_probe, environ={}) == [
        "devices: 32 x TPU v5 lite (tpu) in 4 processes"]


@pytest.mark.parametrize("probe, extra", [
    (SystemProbe(nvidia_smi=_smi("580.159.04", "13.0")), "cuda13"),
    (SystemProbe(nvidia_smi=_smi("550.54.15", "12.4")), "cuda12"),
    (SystemProbe(tpu="4 TPU chips on PCI"), "tpu"),
])
def test_report_warns_when_jax_misses_the_accelerator(probe, extra):
    lines = acc.startup_report(_devices(1, "cpu", "cpu"), lambda: probe, environ={})
    assert lines[0] == "devices: 1 x cpu in 1 process"
    assert len(lines) == 2 and "\n" not in lines[1]
    assert lines[1].startswith("warning: this machine has ")
    assert "JAX sees only the CPU" in lines[1]
    assert f"pip install -c constraints.txt -e '.[{extra}]'" in lines[1]
    assert f"MESHLM_ACCEL={extra}" in lines[1]


def test_report_is_quiet_on_a_cpu_machine_or_when_the_cpu_was_chosen():
    cpus = _devices(8, "cpu", "cpu")
    assert acc.startup_report(cpus, lambda: SystemProbe(), environ={}) == [
        "devices: 8 x cpu in 1 process"]
    for env in ({"JAX_PLATFORMS": "cpu"}, {"MESHLM_ACCEL": "cpu"}):
        assert len(acc.startup_report(cpus, _no_probe, environ=env)) == 1
    old = acc.startup_report(cpus, lambda: SystemProbe(nvidia_smi=_smi("470.82.01", "11.4")),
                             environ={})
    assert len(old) == 2 and "driver is too old" in old[1] and "JAX runs on the CPU" in old[1]


# --- the notebook's install step ------------------------------------------------------------

PINS = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2",
        "jax-cuda12-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2", "jax-cuda13-pjrt": "0.11.2",
        "libtpu": "0.0.48.1"}
CUDA12 = Choice("cuda12", "an NVIDIA GPU (CUDA 12.4)")


def test_pinned_versions_reads_the_constraints():
    pins = acc.pinned_versions(str(REPO / "constraints.txt"))
    assert {k: pins[k] for k in PINS} == PINS  # the accelerator plugins are pinned


def test_jax_fits_only_the_pinned_jax_with_the_extras_plugin():
    jax = {"jax": "0.11.2", "jaxlib": "0.11.2"}
    assert acc.jax_fits("cpu", jax, PINS)
    assert not acc.jax_fits("cuda12", jax, PINS)  # no plugin
    assert acc.jax_fits("cuda12", {**jax, "jax-cuda12-plugin": "0.11.2",
                                   "jax-cuda12-pjrt": "0.11.2"}, PINS)
    assert not acc.jax_fits("cuda13", {**jax, "jax-cuda13-plugin": "0.11.2",
                                       "jax-cuda13-pjrt": "0.11.2",
                                       "jax-cuda12-plugin": "0.11.2"}, PINS)  # two plugins
    assert not acc.jax_fits("tpu", {"jax": "0.9.0", "jaxlib": "0.9.0", "libtpu": "0.0.48.1"},
                            PINS)


def test_plan_on_colab_keeps_a_fitting_jax_and_replaces_another():
    colab_jax = {"jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2",
                 "jax-cuda12-pjrt": "0.11.2"}
    plan = acc.plan_install("/r", CUDA12, True, colab_jax, PINS)
    assert plan.uninstall == () and plan.install == ("-c", "/r/constraints.txt", "-e", "/r")
    assert "Colab runtime" in plan.message and "keeping the installed jax 0.11.2" in plan.message
    tpu = Choice("tpu", "a TPU (1 TPU chip on PCI)")
    plan = acc.plan_install("/r", tpu, True, {**colab_jax, "jax": "0.7.2"}, PINS)
    assert plan.uninstall == ("jax-cuda12-plugin", "jax-cuda12-pjrt")
    assert plan.install == ("-c", "/r/constraints.txt", "-e", "/r[tpu]")
    assert "installing jax 0.11.2 with meshlm[tpu]" in plan.message


def test_plan_outside_colab_leaves_an_environment_with_meshlm_alone():
    env = {"meshlm": "0.1.0", "jax": "0.11.2", "jaxlib": "0.11.2"}
    plan = acc.plan_install("/r", Choice("cpu", "no NVIDIA GPU or TPU found"), False, env, PINS)
    assert plan.install == plan.uninstall == () and "meshlm is installed" in plan.message
    plan = acc.plan_install("/r", CUDA12, False, env, PINS)  # a GPU, a CPU-only JAX: only a note
    assert plan.install == plan.uninstall == ()
    assert "pip install -c /r/constraints.txt -e /r[cuda12]" in plan.message
    plan = acc.plan_install("/r", CUDA12, False, {"jax": "0.11.2"}, PINS)  # no meshlm: install
    assert plan.install == ("-c", "/r/constraints.txt", "-e", "/r[cuda12]")


def test_install_step_outside_colab_runs_pip_and_says_when_to_restart(monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    calls = []
    versions = iter([{"jax": "0.9.0"}, {"numpy": "2.0.0"}, {"numpy": "2.5.2"}])
    monkeypatch.setattr(acc, "installed_versions", lambda: next(versions))
    monkeypatch.delenv("MESHLM_ACCEL", raising=False)
    restart = acc.install_for_notebook(str(REPO), colab=False, probe=lambda: SystemProbe(),
                                       run=lambda argv, check: calls.append(argv))
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-c",
                      str(REPO / "constraints.txt"), "-e", str(REPO)]]
    assert str(REPO / "src") in sys.path
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "this runtime: no NVIDIA GPU or TPU found; installing jax 0.11.2 with meshlm"
    assert restart and out[1].startswith("Restart needed (restart the kernel)")
    assert "numpy" in out[1]  # imported here, then replaced


def test_notebook_first_cell_outside_colab_changes_nothing(monkeypatch, capsys):
    """The cell as written, run from notebooks/ in this checkout's environment (which has
    meshlm and the pinned JAX): it finds the checkout and installs nothing."""
    if "meshlm" not in acc.installed_versions():  # e.g. run from a PYTHONPATH, not `make test`
        pytest.skip("meshlm is not installed in this environment: the cell would install it")
    cell = json.loads((REPO / "notebooks/quickstart.ipynb").read_text())["cells"][1]
    source = "".join(cell["source"])
    assert "install_for_notebook" in source
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("PATH", "")  # no nvidia-smi to run, whatever the machine
    monkeypatch.chdir(REPO / "notebooks")
    for name in ("COLAB_RELEASE_TAG", "MESHLM_ACCEL"):
        monkeypatch.delenv(name, raising=False)
    exec(compile(source, "quickstart.ipynb[1]", "exec"), {})
    assert calls == []
    out = capsys.readouterr().out
    assert out.startswith("this runtime: ") and "meshlm is installed" in out, out


def test_readme_colab_section_shows_the_cell_as_it_is():
    cell = json.loads((REPO / "notebooks/quickstart.ipynb").read_text())["cells"][1]
    readme = (REPO / "README.md").read_text()
    colab = readme[readme.index("\n## Colab\n"):]
    assert "https://colab.research.google.com/github/<owner>/<repo>/blob/main/notebooks/" in colab
    assert f"```python\n{''.join(cell['source'])}\n```" in colab
