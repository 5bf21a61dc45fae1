"""XLA options of the compiled steps: the backend's measured defaults, then ``train.xla_flags``.

They go to ``Lowered.compile(compiler_options=...)``, so they shape this run's train and eval
steps only, not every computation in the process as ``XLA_FLAGS`` does (which XLA still reads
first; these override it). ``train.xla_flags`` is written as ``XLA_FLAGS`` is, e.g.
``--xla_disable_hlo_passes=dot-merger --xla_gpu_enable_triton_gemm=true``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshlm.config import ConfigError

# Per backend, measured on the project's configs (BENCHMARKS.md): on a GPU, cuBLAS rather than
# XLA's Triton GEMMs for plain matrix products (~4% of GPT-2 125M's train step, H100, session 5).
BACKEND_DEFAULTS = {"gpu": "--xla_gpu_enable_triton_gemm=false"}

Value = bool | int | float | str


def _value(text: str) -> Value:
    """A flag's value as XLA's option setter takes it: booleans and numbers typed, else text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse(flags: str, key: str = "train.xla_flags") -> dict[str, Value]:
    """``"--name=value --other"`` -> ``{"name": value, "other": True}``."""
    options = {}
    for word in flags.split():
        name, eq, text = word.partition("=")
        if not name.startswith("--") or len(name) < 3:
            raise ConfigError(f"{key}: {word!r} is not an XLA flag; write each as --name=value "
                              "(or --name for true), separated by spaces")
        options[name[2:]] = _value(text) if eq else True
    return options


def compiler_options(flags: str, platform: str) -> dict[str, Value]:
    """The options for a step compiled for devices of ``platform`` (``jax.Device.platform``)."""
    return parse(BACKEND_DEFAULTS.get(platform, ""), "BACKEND_DEFAULTS") | parse(flags)


def check(flags: str, device: jax.Device) -> None:
    """An option XLA does not know, or a value of the wrong type, is a ``ConfigError`` here
    (from compiling a one-element function for ``device`` with the options), not after a
    model's trace."""
    if not flags.strip():
        return
    options = compiler_options(flags, device.platform)
    x = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(jnp.negative).lower(x).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"train.xla_flags={flags!r}: XLA rejects it: "
                          f"{str(e).splitlines()[0]}") from None
