"""Throughput, model FLOPs utilization and the metric writers (TensorBoard + JSONL).

MFU follows the PaLM definition: achieved model FLOPs per second (tokens/s times the model's
training FLOPs per token, recomputation not counted) over the devices' dense bf16 peak.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data sheets. Matched as a
# lowercase substring of ``jax.Device.device_kind``, first match wins, so specific names (PCIe)
# come before their family.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.5e12),
    ("h100", 989.4e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("h200", 989.4e12),  # same compute as the H100 SXM, more and faster memory
    ("gh200", 989.4e12),
    ("h800", 989.4e12),
    ("a100", 312e12),
    ("l40s", 362.05e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu7x", 2307e12),  # Ironwood
)


def peak_flops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs and unlisted accelerators)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, devices: Sequence[jax.Device]
        ) -> float | None:
    """Fraction of the devices' peak used by the model's own FLOPs; None without a known peak."""
    peak = peak_flops(devices[0]) if devices else None
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (len(devices) * peak)


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


class MetricWriter:
    """Scalars to TensorBoard event files (``<run_dir>/tensorboard``) and to
    ``<run_dir>/metrics.jsonl``, one JSON object per line: ``{"step", "split", name: value...}``.

    The JSONL file is appended to, so a resumed run continues the same record. A run killed
    after its last checkpoint wrote records for steps that the resumed run replays: given
    ``first_step`` (0 for a fresh start, the restored step + 1 on resume), records of that step
    and later are dropped from both files before writing, so each step is recorded once. Only
    the ``primary`` process (index 0 of a multi-process run) writes; the others' calls do
    nothing, so a run directory shared by every process gets one record.
    """

    def __init__(self, run_dir: str | os.PathLike, *, primary: bool = True,
                 first_step: int | None = None):
        self._primary = primary
        if not primary:
            return
        from tensorboardX import SummaryWriter  # heavy import, only for writing runs

        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if first_step is not None:
            dropped = drop_records_from(run_dir, first_step)
            if dropped:
                log.info("dropped %d metric records of steps >= %d left by an interrupted run",
                         dropped, first_step)
        # purge_step hides the TensorBoard events of the replayed steps the same way.
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, split: str, values: Mapping[str, float | None]) -> None:
        if not self._primary:
            return
        values = {k: (None if v is None else float(v)) for k, v in values.items()}
        for name, value in values.items():
            if value is not None:
                self._tb.add_scalar(f"{split}/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if not self._primary:
            return
        self._tb.close()
        self._jsonl.close()


def drop_records_from(run_dir: str | os.PathLike, step: int) -> int:
    """Remove the records of ``step`` and later from ``<run_dir>/metrics.jsonl`` (rewritten
    whole, then renamed into place); returns how many were removed."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line + "\n" for line in lines if _step_of(line) < step]
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write: dropped
        return math.inf


def read_jsonl(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of ``<run_dir>/metrics.jsonl`` in order."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
