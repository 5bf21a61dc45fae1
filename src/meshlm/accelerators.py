"""Which JAX accelerator extra fits this machine, what ``meshlm train`` says about its devices, and
the notebook's install step.

Standard library only: ``make`` runs ``python -m meshlm.accelerators`` before JAX is installed,
and the notebook's first cell runs this file before meshlm is installed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

ENV_VAR = "MESHLM_ACCEL"
EXTRAS = ("cpu", "cuda12", "cuda13", "tpu")
# The distributions each extra adds beside jax/jaxlib (JAX's PJRT plugins): two of them in one
# environment fight over the device, so changing the extra removes the others'.
PLUGINS = {
    "cpu": (),
    "cuda12": ("jax-cuda12-plugin", "jax-cuda12-pjrt"),
    "cuda13": ("jax-cuda13-plugin", "jax-cuda13-pjrt"),
    "tpu": ("libtpu",),
}
# PCI device ids of TPU chips (vendor Google, 0x1ae0): v2/v3, v4, v5p, v5e, v6e, 7x. Other Google
# PCI devices (the gVNIC network card, local SSDs) are not TPUs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
# A driver's CUDA version when nvidia-smi does not print it: the first driver of each major.
_CUDA_MAJOR_BY_DRIVER = ((580, 13), (525, 12))


@dataclass(frozen=True)
class SystemProbe:
    """What the machine shows without JAX.

    ``nvidia_smi``: the output of ``nvidia-smi`` (None when it is absent or fails); ``tpu``: how a
    TPU shows itself (e.g. ``"4 TPU chips on PCI"``), None when none does.
    """

    nvidia_smi: str | None = None
    tpu: str | None = None


@dataclass(frozen=True)
class Choice:
    extra: str  # one of EXTRAS
    reason: str  # what the choice rests on, for a person


def probe_system(root: str = "/", environ: Mapping[str, str] | None = None,
                 nvidia_smi: Callable[[], str | None] | None = None) -> SystemProbe:
    """Look for NVIDIA GPUs (``nvidia-smi``) and TPU chips (PCI ids, ``/dev/accel*``, the TPU
    runtime's ``TPU_ACCELERATOR_TYPE``). ``root`` and ``nvidia_smi`` are for tests."""
    environ = os.environ if environ is None else environ
    return SystemProbe(nvidia_smi=(nvidia_smi or _run_nvidia_smi)(),
                       tpu=_find_tpu(root, environ))


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _find_tpu(root: str, environ: Mapping[str, str]) -> str | None:
    chips = 0
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        device = os.path.join(os.path.dirname(vendor), "device")
        if _read(vendor) == _GOOGLE_PCI_VENDOR and _read(device) in _TPU_PCI_DEVICES:
            chips += 1
    if chips:
        return f"{chips} TPU chip{'s' * (chips > 1)} on PCI"
    accel = sorted(glob.glob(os.path.join(root, "dev/accel[0-9]*")))
    if accel:
        return f"{len(accel)} TPU device file{'s' * (len(accel) > 1)} (/dev/accel*)"
    if environ.get("TPU_ACCELERATOR_TYPE"):
        return f"TPU_ACCELERATOR_TYPE={environ['TPU_ACCELERATOR_TYPE']}"
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cuda_version(nvidia_smi: str) -> tuple[int, int] | None:
    """The newest CUDA the driver runs, from nvidia-smi's header (``CUDA Version: 13.0``), else
    from its driver version (R580 and later run CUDA 13, R525 and later CUDA 12)."""
    if m := re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", nvidia_smi):
        return int(m[1]), int(m[2])
    if m := re.search(r"Driver Version\s*:\s*(\d+)\.", nvidia_smi):
        for driver, major in _CUDA_MAJOR_BY_DRIVER:
            if int(m[1]) >= driver:
                return major, 0
        return 11, 0
    return None


def _nvidia_summary(nvidia_smi: str) -> str:
    driver = re.search(r"Driver Version\s*:\s*([\d.]+)", nvidia_smi)
    cuda = cuda_version(nvidia_smi)
    parts = ([f"driver {driver[1]}"] if driver else []) + ([f"CUDA {cuda[0]}.{cuda[1]}"]
                                                          if cuda else [])
    return f"an NVIDIA GPU ({', '.join(parts) or 'nvidia-smi'})"


def detect_extra(probe: SystemProbe) -> Choice:
    """The extra this machine's accelerator needs, from the probe alone."""
    if probe.tpu:
        return Choice("tpu", f"a TPU ({probe.tpu})")
    if probe.nvidia_smi is not None:
        what = _nvidia_summary(probe.nvidia_smi)
        cuda = cuda_version(probe.nvidia_smi)
        if cuda is None or cuda[0] >= 13:
            return Choice("cuda13", what)
        if cuda[0] == 12:
            return Choice("cuda12", what)
        return Choice("cpu", f"{what} whose driver is too old for JAX (CUDA 12 needs driver "
                             ">= 525, CUDA 13 >= 580)")
    return Choice("cpu", "no NVIDIA GPU or TPU found")


def select_extra(probe: SystemProbe, environ: Mapping[str, str] | None = None) -> Choice:
    """``MESHLM_ACCEL`` when set, else :func:`detect_extra`. An unknown value is a ValueError."""
    environ = os.environ if environ is None else environ
    forced = environ.get(ENV_VAR, "").strip()
    if not forced:
        return detect_extra(probe)
    if forced not in EXTRAS:
        raise ValueError(f"{ENV_VAR}={forced!r} is not one of {', '.join(EXTRAS)} "
                         "(unset it to pick from the machine)")
    return Choice(forced, f"{ENV_VAR}={forced}")


def foreign_plugins(extra: str) -> list[str]:
    """The plugin distributions of every extra but ``extra`` (to uninstall when switching)."""
    return [d for other, dists in PLUGINS.items() if other != extra for d in dists]


def startup_report(devices: Sequence, probe: Callable[[], SystemProbe] = probe_system,
                   environ: Mapping[str, str] | None = None) -> list[str]:
    """The lines ``meshlm train`` prints before training: the devices (kind, count, processes)
    and, when JAX sees only CPUs but the system shows a GPU or TPU, a one-line warning naming the
    extra to install. ``devices`` are JAX devices (``platform``, ``device_kind``,
    ``process_index``); ``probe`` runs only in that CPU-only case, and not when the CPU was chosen
    (``JAX_PLATFORMS=cpu`` or ``MESHLM_ACCEL=cpu``)."""
    environ = os.environ if environ is None else environ
    kinds = collections.Counter((d.platform, d.device_kind) for d in devices)
    processes = len({d.process_index for d in devices})
    what = ", ".join(f"{n} x {kind}" + (f" ({platform})" if kind != platform else "")
                     for (platform, kind), n in kinds.items())
    lines = [f"devices: {what} in {processes} process{'es' * (processes > 1)}"]
    chose_cpu = "cpu" in (environ.get("JAX_PLATFORMS", ""), environ.get(ENV_VAR, ""))
    if any(d.platform != "cpu" for d in devices) or chose_cpu:
        return lines
    system = probe()
    choice = detect_extra(system)
    if choice.extra != "cpu":
        lines.append(f"warning: this machine has {choice.reason} but JAX sees only the CPU; "
                     f"install meshlm[{choice.extra}]: pip install -c constraints.txt -e "
                     f"'.[{choice.extra}]' (or make train MESHLM_ACCEL={choice.extra})")
    elif system.nvidia_smi is not None:
        lines.append(f"warning: this machine has {choice.reason}; JAX runs on the CPU")
    return lines


# --- the notebook's first cell --------------------------------------------------------------

def in_colab(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return "COLAB_RELEASE_TAG" in environ or "google.colab" in sys.modules


def installed_versions() -> dict[str, str]:
    """Every installed distribution's version, by normalized name."""
    return {_normalize(d.metadata["Name"] or ""): d.version
            for d in importlib.metadata.distributions()}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(constraints: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalized name."""
    pins = {}
    with open(constraints) as f:
        for line in f:
            if m := re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*(\S+)", line):
                pins[_normalize(m[1])] = m[2]
    return pins


def jax_fits(extra: str, installed: Mapping[str, str], pins: Mapping[str, str]) -> bool:
    """Whether the installed JAX is the pinned one with ``extra``'s plugin and no other's."""
    if installed.get("jax") != pins["jax"] or installed.get("jaxlib") != pins["jaxlib"]:
        return False
    if any(d in installed for d in foreign_plugins(extra)):
        return False
    return all(installed.get(d) == pins.get(d, installed.get(d)) for d in PLUGINS[extra])


@dataclass(frozen=True)
class InstallPlan:
    uninstall: tuple[str, ...]  # plugin distributions to remove first
    install: tuple[str, ...]  # pip install arguments; empty: nothing to install
    message: str


def plan_install(root: str, choice: Choice, colab: bool, installed: Mapping[str, str],
                 pins: Mapping[str, str]) -> InstallPlan:
    """What the notebook's first cell does. On Colab: keep its JAX when it is the pinned one with
    the runtime's plugin, else install the pinned JAX with that plugin. Elsewhere an environment
    that has meshlm is left alone (a wrong JAX is only reported); one without gets it."""
    where = f"{'Colab' if colab else 'this'} runtime: {choice.reason}"
    fits = jax_fits(choice.extra, installed, pins)
    extra = "" if choice.extra == "cpu" else f"[{choice.extra}]"
    pip = ("-c", os.path.join(root, "constraints.txt"), "-e", root + extra)
    if "meshlm" in installed and (fits or not colab):
        note = "" if fits else (f"; its JAX is not the pinned jax {pins['jax']} with "
                                f"meshlm[{choice.extra}]'s plugin: pip install {' '.join(pip)}")
        return InstallPlan((), (), f"{where}; meshlm is installed{note}")
    if fits:
        return InstallPlan((), pip[:3] + (root,),
                           f"{where}; keeping the installed jax {installed['jax']}")
    gone = tuple(d for d in foreign_plugins(choice.extra) if d in installed)
    return InstallPlan(gone, pip, f"{where}; installing jax {pins['jax']} with meshlm{extra or ''}")


def install_for_notebook(root: str, *, colab: bool | None = None,
                         probe: Callable[[], SystemProbe] = probe_system,
                         run: Callable[..., object] = subprocess.run) -> bool:
    """Install meshlm from the checkout ``root`` for this runtime (see :func:`plan_install`),
    make it importable in this kernel, and say whether the runtime must restart: it must when
    pip replaced a package this kernel already imported. Returns that."""
    colab = in_colab() if colab is None else colab
    root = os.path.abspath(root)
    plan = plan_install(root, select_extra(probe()), colab, installed_versions(),
                        pinned_versions(os.path.join(root, "constraints.txt")))
    print(plan.message)
    before = installed_versions()
    if plan.uninstall:
        run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *plan.uninstall], check=True)
    if plan.install:
        run([sys.executable, "-m", "pip", "install", "-q", *plan.install], check=True)
        # The editable install's paths take effect at interpreter start; this kernel needs them now.
        sys.path[:0] = [p for p in (root, os.path.join(root, "src")) if p not in sys.path]
        importlib.invalidate_caches()
    stale = _stale_modules(before, installed_versions())
    if stale:
        how = "Runtime > Restart session" if colab else "restart the kernel"
        print(f"Restart needed ({how}), then run the notebook from the next cell: pip replaced "
              f"{', '.join(stale)} after this kernel imported it.")
    return bool(stale)


def _stale_modules(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    changed = {name for name, version in before.items() if after.get(name) != version}
    owners = importlib.metadata.packages_distributions()
    return sorted(m for m, dists in owners.items()
                  if m in sys.modules and any(_normalize(d) in changed for d in dists))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshlm.accelerators",
        description=f"Print the extra ({', '.join(EXTRAS)}) for this machine; {ENV_VAR} "
                    "overrides the choice.")
    parser.add_argument("--why", action="store_true", help="print what the choice rests on")
    parser.add_argument("--foreign", metavar="EXTRA", choices=EXTRAS,
                        help="print the plugin distributions of the other extras")
    args = parser.parse_args(argv)
    if args.foreign:
        print(" ".join(foreign_plugins(args.foreign)))
        return 0
    try:
        choice = select_extra(probe_system())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{choice.extra}: {choice.reason}" if args.why else choice.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
