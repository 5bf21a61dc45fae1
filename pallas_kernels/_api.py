"""Argument checks, lowering loading, the compilation target and the scan kernels' custom VJP
that the ``api`` modules share."""

from __future__ import annotations

import functools
import importlib
import numbers

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values


def is_int(x) -> bool:
    """A static Python integer (``bool`` excluded: ``True`` is not a block size)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def shape_of(x):
    """``x.shape``, or the type name of a non-array, for error messages."""
    return getattr(x, "shape", type(x).__name__)


@functools.cache
def load_lowering(package: str, name: str):
    """``(module, None)`` or ``(None, why)`` for ``package.name``; cached so a failing import is
    tried once."""
    try:
        return importlib.import_module(f"{package}.{name}"), None
    except Exception as e:  # noqa: BLE001 - any import failure just makes the lowering unavailable
        return None, f"{type(e).__name__}: {e}"


_LOWERING_PLATFORM = {"triton": "gpu", "mosaic_gpu": "gpu", "tpu": "tpu"}


def target_platform() -> str:
    """The platform being compiled for: the abstract mesh's device when one is set (lowering ahead
    of time for another machine, e.g. exporting for a GPU from a CPU host), else the default
    backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        return jax.default_backend()
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


def gpu_arch() -> str | None:
    """The target GPU's compute capability as ``"9.0"``, or None off a GPU or for an unknown one."""
    # What the Pallas Triton lowering itself compiles for, abstract mesh included.
    from jax._src.pallas.triton import gpu_info

    try:
        return gpu_info.get_gpu_info().arch_name
    except ValueError:
        return None


def lowering_for(device_kind: str, platform: str = "gpu"):
    """A context in which ``jit`` lowers for an abstract device of that kind (ahead-of-time
    compilation for another machine): the kernels take its lowering and tiles from any host."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def platform_reason(lowering: str) -> str | None:
    """Why the target platform cannot run ``lowering`` natively (None if it can)."""
    want, got = _LOWERING_PLATFORM[lowering], target_platform()
    return None if got == want else f"needs a {want.upper()} backend, got {got}"


def named_lowering(package: str, implementation: str, interpret: bool, unsupported, *,
                   platform=platform_reason):
    """The module of the lowering a caller named, or a ``ValueError`` saying why it cannot run
    this call: it failed to import, the target cannot run it natively (unless ``interpret``), or
    ``unsupported(module)`` (a reason or None) refuses the arguments."""
    module, error = load_lowering(package, implementation)
    if module is None:
        raise ValueError(f"implementation={implementation!r} is unavailable ({error})")
    if not interpret and (why := platform(implementation)):
        raise ValueError(
            f"implementation={implementation!r} {why}; pass interpret=True to run it in "
            "interpret mode"
        )
    if why := unsupported(module):
        raise ValueError(f"implementation={implementation!r} does not support this call: {why}")
    return module


def unvary_like(g, primal):
    """``g`` summed over the mesh axes it varies over and ``primal`` does not (None stays None).

    Inside ``shard_map`` an input replicated over mesh axes (A, D, a bias next to a sharded batch)
    gets the sum of every shard's gradient, as autodiff of the implicit ``pvary`` would."""
    if g is None:
        return None
    extra = tuple(jax.typeof(g).mat.varying - jax.typeof(primal).mat.varying)
    return jax.lax.psum(g, extra) if extra else g


def checkpointed_scan(package: str):
    """A custom-VJP ``scan(cfg, *args) -> (y, final_state)`` over the lowering module
    ``package.<cfg.implementation>`` (the selective scan's and SSD's; ``cfg`` is static).

    The module's ``forward(*args, cfg, save_checkpoints)`` returns ``(y, final_state,
    checkpoints)``; under differentiation it saves the per-chunk states, from which
    ``backward(dy, dh_final, *args, checkpoints, cfg)`` recomputes the rest (one gradient per
    argument, None for absent ones). An unused output's cotangent arrives as zeros (``dy``) or
    None (``dh_final``).
    """

    def module(cfg):
        return load_lowering(package, cfg.implementation)[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scan(cfg, *args):
        y, h_final, _ = module(cfg).forward(*args, cfg, save_checkpoints=False)
        return y, h_final

    def scan_fwd(cfg, *primals):
        args = custom_vjp_primal_tree_values(primals)
        y, h_final, ckpt = module(cfg).forward(*args, cfg, save_checkpoints=True)
        return (y, h_final), (args, ckpt)

    def scan_bwd(cfg, residuals, cotangents):
        args, ckpt = residuals
        dy, dh_final = cotangents
        x = args[0]
        dy = jnp.zeros_like(x) if isinstance(dy, SymbolicZero) else dy.astype(x.dtype)
        dh_final = None if isinstance(dh_final, SymbolicZero) else dh_final.astype(jnp.float32)
        grads = module(cfg).backward(dy, dh_final, *args, ckpt, cfg)
        return tuple(map(unvary_like, grads, args))

    scan.defvjp(scan_fwd, scan_bwd, symbolic_zeros=True)
    return scan
