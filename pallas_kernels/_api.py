"""What the ``api`` modules of every op share: the dispatch policy (``Dispatch``), argument checks,
lowering loading, the compilation target and its per-device defaults, and the custom VJPs (the
scan kernels' checkpointed one; the recomputing one of the elementwise-in-time ops)."""

from __future__ import annotations

import dataclasses
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


FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_last_axis(x, name: str, axis: str) -> None:
    """``ValueError`` unless ``x`` is a floating array ``(..., axis)`` of ``FLOAT_DTYPES`` whose
    last axis (named ``axis`` in the message) is not empty."""
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be an array (..., {axis}) with {axis} >= 1, got "
                         f"{shape_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")


@functools.cache
def load_lowering(package: str, name: str):
    """``(module, None)`` or ``(None, why)`` for ``package.name``; cached so a failing import is
    tried once."""
    try:
        return importlib.import_module(f"{package}.{name}"), None
    except Exception as e:  # noqa: BLE001 - any import failure just makes the lowering unavailable
        return None, f"{type(e).__name__}: {e}"


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


def lowering_for(device_kind: str, platform: str = "gpu", mesh=None):
    """A context in which ``jit`` lowers for an abstract device of that kind (ahead-of-time
    compilation for another machine): the kernels take its lowering and tiles from any host.
    ``mesh`` (a ``Mesh``; default one device) gives the abstract mesh its axes and sizes, so a
    sharded program lowers for that machine too."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    shape, names = ((1,), ("x",)) if mesh is None else (tuple(mesh.shape.values()),
                                                         tuple(mesh.axis_names))
    abstract = jax.sharding.AbstractMesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), abstract_device=device)
    return jax.sharding.use_abstract_mesh(abstract)


def target_device_kind() -> str:
    """The device kind being compiled for (the abstract mesh's, else the default device's)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return (device or jax.devices()[0]).device_kind


def device_default(table: dict):
    """The entry of a lowering's per-device default table for the target device.

    Keys are compute capabilities (``"9.0"``) or substrings of the device kind (``"v5 lite"``);
    ``""`` holds the default for every other device.
    """
    arch, kind = gpu_arch(), target_device_kind().lower()
    for key, value in table.items():
        if key and (key == arch or key.lower() in kind):
            return value
    return table[""]


# ----------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One named implementation of an op besides ``"xla"``.

    Its module ``<package>.<name>`` provides ``supports(call, tiles) -> reason or None`` and, for
    a Pallas lowering, ``Tiles`` (a frozen dataclass of its launch shape) and
    ``default_tiles(call) -> Tiles`` (looked up in its per-device table with
    ``device_default``). ``call`` is the op's static description of the arguments. It may also
    provide ``auto_declines(call) -> reason or None``: calls it runs when named that ``"auto"``
    leaves to the next lowering (a path not yet measured faster than that one on a device).
    """

    name: str
    platform: str  # "gpu" or "tpu": the backend it runs on natively
    arch: str | None = None  # a compute-capability prefix it needs ("9." for Hopper)
    pallas: bool = True  # runs in interpret mode with interpret=True; takes tiles=
    auto: bool = True  # "auto" may pick it


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The implementations of one op and the policy shared by every op.

    - ``"xla"`` is the op's plain-JAX implementation.
    - ``"auto"`` picks the first of ``lowerings`` (listed fastest first) that runs natively on the
      target platform, imports, and supports the call with its default tiles; else ``"xla"``. It
      never raises, and ``interpret`` never changes what it picks.
    - A named lowering runs or raises a ``ValueError`` saying why: it failed to import, the target
      cannot run it natively (``interpret=True`` runs a named Pallas lowering on any backend, in
      interpret mode), or it does not support the call or the given tiles.
    - ``tiles=`` is the named Pallas lowering's ``Tiles``; None takes its per-device default.
    """

    package: str
    lowerings: tuple[Lowering, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return ("auto", "xla", *(lowering.name for lowering in self.lowerings))

    def choose(self, implementation: str, call, *, interpret: bool, tiles=None):
        """``(name, tiles)``: ``("xla", None)`` or a lowering and its tiles (None if not Pallas)."""
        if implementation not in self.names:
            raise ValueError(f"implementation must be one of {self.names}, got {implementation!r}")
        if tiles is not None and implementation in ("auto", "xla"):
            pallas = tuple(x.name for x in self.lowerings if x.pallas)
            raise ValueError(
                f"tiles are the launch shape of one Pallas lowering: name it with implementation= "
                f"(one of {pallas}), got implementation={implementation!r}"
            )
        if implementation == "xla":
            return "xla", None
        if implementation == "auto":
            return self._auto(call)
        return self._named(implementation, call, interpret, tiles)

    def configure(self, implementation: str, call, *, interpret: bool, tiles, xla,
                  empty: bool = False):
        """The static kernel configuration of an op whose lowerings take ``config(call, tiles,
        interpret)``: the chosen lowering's, or ``xla`` (the plain-JAX form's) when ``"xla"``
        is chosen or the call is ``empty``."""
        name, tiles = self.choose(implementation, call, interpret=interpret, tiles=tiles)
        if name == "xla" or empty:
            return xla
        return load_lowering(self.package, name)[0].config(call, tiles, interpret)

    def _auto(self, call):
        for lowering in self.lowerings:
            if not lowering.auto or _platform_reason(lowering):
                continue
            module, _ = load_lowering(self.package, lowering.name)
            if module is None:
                continue
            tiles = module.default_tiles(call) if lowering.pallas else None
            declines = getattr(module, "auto_declines", lambda call: None)
            if module.supports(call, tiles) is None and declines(call) is None:
                return lowering.name, tiles
        return "xla", None

    def unavailable(self, name: str, interpret: bool = False, hint: bool = True) -> str | None:
        """Why lowering ``name`` cannot run on the target whatever the call (None if it can);
        ``hint``: say that a Pallas lowering would run in interpret mode."""
        lowering = next(x for x in self.lowerings if x.name == name)
        module, error = load_lowering(self.package, name)
        if module is None:
            return f"is unavailable ({error})"
        if interpret and not lowering.pallas:
            return "is not a Pallas kernel: it has no interpret mode (interpret=True)"
        if not interpret and (why := _platform_reason(lowering)):
            tip = "; pass interpret=True to run it in interpret mode" if lowering.pallas else ""
            return why + (tip if hint else "")
        return None

    def _named(self, name, call, interpret, tiles):
        if why := self.unavailable(name, interpret):
            raise ValueError(f"implementation={name!r} {why}")
        lowering = next(x for x in self.lowerings if x.name == name)
        module, _ = load_lowering(self.package, name)
        if tiles is None:
            tiles = module.default_tiles(call) if lowering.pallas else None
        elif not lowering.pallas:
            raise ValueError(f"implementation={name!r} takes no tiles, got {tiles!r}")
        else:
            _check_tiles(tiles, module.Tiles)
        if why := module.supports(call, tiles):
            raise ValueError(f"implementation={name!r} does not support this call: {why}")
        return name, tiles


def _platform_reason(lowering: Lowering) -> str | None:
    """Why the target cannot run ``lowering`` natively (None if it can)."""
    if (got := target_platform()) != lowering.platform:
        return f"needs a {lowering.platform.upper()} backend, got {got}"
    if lowering.arch is not None and not (arch := gpu_arch() or "").startswith(lowering.arch):
        return f"needs a GPU of compute capability {lowering.arch}x, got {arch or 'unknown'}"
    return None


def _check_tiles(tiles, cls, path: str = "tiles"):
    """``tiles`` is a ``cls`` whose leaves (nested tile dataclasses allowed) are ints >= 1, bools
    where the field's default is one (a switch between two forms of a kernel), or None where
    the field's default is None (another field's value)."""
    if not isinstance(tiles, cls):
        raise ValueError(f"{path} must be a {_qualified(cls)}, got {_qualified(type(tiles))}")
    for field in dataclasses.fields(tiles):
        value, where = getattr(tiles, field.name), f"{path}.{field.name}"
        if value is None and field.default is None:
            continue
        if dataclasses.is_dataclass(value):
            _check_tiles(value, type(value), where)
        elif isinstance(field.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be True or False, got {value!r}")
        elif not is_int(value) or value < 1:
            raise ValueError(f"{where} must be a positive int, got {value!r}")


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unvary_like(g, primal):
    """``g`` with ``primal``'s varying mesh axes (None stays None): summed over the axes it varies
    over and ``primal`` does not, and marked varying over those ``primal`` varies over and it
    does not.

    Inside ``shard_map`` an input replicated over mesh axes (A, D, a bias next to a sharded batch)
    gets the sum of every shard's gradient, as autodiff of the implicit ``pvary`` would; and a
    kernel whose output type names no varying axes (JAX's own Hopper kernels) still returns a
    gradient typed like its input, as a custom VJP must."""
    if g is None:
        return None
    have, want = jax.typeof(g).mat.varying, jax.typeof(primal).mat.varying
    if extra := tuple(have - want):
        g = jax.lax.psum(g, extra)
    if missing := tuple(want - have):
        g = jax.lax.pcast(g, missing, to="varying")
    return g


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


def recomputing_op(package: str):
    """A custom-VJP ``op(cfg, *args)`` over the lowering module ``package.<cfg.implementation>``
    (``cfg`` static) whose only residuals are its inputs: the causal conv's and the norms'.

    The module's ``forward(*args, cfg)`` returns the output; ``backward(dout, *args, cfg)``
    recomputes what it needs and returns one gradient per argument (None for absent ones and
    for integer inputs).
    """

    def module(cfg):
        return load_lowering(package, cfg.implementation)[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(cfg, *args):
        return module(cfg).forward(*args, cfg)

    def op_fwd(cfg, *args):
        return module(cfg).forward(*args, cfg), args

    def op_bwd(cfg, args, dout):
        grads = module(cfg).backward(dout, *args, cfg)
        return tuple(map(unvary_like, grads, args))

    op.defvjp(op_fwd, op_bwd)
    return op
