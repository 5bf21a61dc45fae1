"""Mesh construction and the logical-axis rule table: the only module that names mesh axes.

Model code annotates parameters and large activations with logical names (``batch``, ``embed``,
``heads``...). The config's rule table maps those names onto the mesh axes below, so data
parallelism, FSDP and tensor parallelism are config changes, never model changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshlm.config import ConfigError, MeshConfig

# Slowest to fastest interconnect: tensor parallelism talks most, so it is innermost (neighbouring
# devices); pipeline stages talk least.
MESH_AXES = ("pipeline", "data", "fsdp", "sequence", "expert", "tensor")
# Activation axes (what a tensor flowing through the model is split by) and parameter axes (how
# weights are laid out) are separate names; config.DEFAULT_RULES maps both.
ACTIVATION_AXES = (
    "activation_batch", "activation_length", "activation_embed", "activation_heads",
    "activation_kv_heads", "activation_mlp", "activation_inner", "activation_vocab",
    "activation_expert", "activation_stage",
)
PARAMETER_AXES = (
    "embed", "heads", "kv_heads", "head_dim", "mlp", "inner", "state", "conv", "vocab", "expert",
    "layers", "stage",
)
LOGICAL_AXES = ACTIVATION_AXES + PARAMETER_AXES


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve the one ``-1`` axis and check that the mesh uses exactly the devices present."""
    sizes = {name: getattr(cfg, name) for name in MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    bad = [f"mesh.{n}={s}" for n, s in sizes.items() if s == 0 or s < -1]
    if bad or len(free) > 1:
        raise ConfigError(
            "mesh axis sizes must be positive with at most one -1 (all remaining devices); got "
            + ", ".join(bad or [f"mesh.{n}=-1" for n in free])
        )
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"the mesh's fixed axes need a multiple of {fixed} devices but {num_devices} exist"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items() if s != 1) or "1"
        raise ConfigError(
            f"the mesh ({shape}) asks for {fixed} devices but {num_devices} exist; "
            "set one mesh axis to -1 to take all remaining devices"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process) with ``MESH_AXES``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    try:
        return jax.make_mesh(
            shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
            devices=devices,
        )
    except (ValueError, NotImplementedError):
        # Topology-aware placement is not possible for every shape (e.g. fake CPU devices of odd
        # counts); a row-major layout is always valid.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_rules(cfg: MeshConfig) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rule table, checked: known logical names, known mesh axes."""
    for logical, mesh_axes in cfg.rules:
        if logical not in LOGICAL_AXES:
            raise ConfigError(
                f"mesh.rules: unknown logical axis {logical!r}; valid: {', '.join(LOGICAL_AXES)}"
            )
        names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        for name in names:
            if name not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules: logical axis {logical!r} maps to unknown mesh axis {name!r}; "
                    f"valid: {', '.join(MESH_AXES)}"
                )
    return tuple(cfg.rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
    """Make ``mesh`` and ``rules`` current so ``nn.with_logical_constraint`` inside models binds."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_specs, mesh: Mesh, rules):
    """Pytree of logical ``PartitionSpec``s -> pytree of ``NamedSharding``s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def named_sharding(mesh: Mesh, rules, *logical_axes: str | None) -> NamedSharding:
    """The sharding of one array whose dimensions carry ``logical_axes``."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a ``(batch, length)`` token array."""
    return named_sharding(mesh, rules, "activation_batch", "activation_length")


def axis_size(mesh: Mesh, rules, logical: str) -> int:
    """How many shards the rules split a dimension named ``logical`` into on ``mesh``."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    names = (spec,) if isinstance(spec, str) else (spec or ())
    return math.prod(mesh.shape[n] for n in names)


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split (the global batch must divide by it)."""
    return axis_size(mesh, rules, "activation_batch")


def rows_held(
    sharding: NamedSharding, shape: tuple[int, ...], devices: Sequence[jax.Device] | None = None
) -> list[tuple[int, int]]:
    """The ``[start, stop)`` runs of leading-dimension indices that ``devices`` (default: this
    process's) hold of an array of ``shape`` under ``sharding``, merged and in order."""
    held = sharding.addressable_devices_indices_map(shape) if devices is None else {
        d: index for d, index in sharding.devices_indices_map(shape).items() if d in devices}
    runs: list[tuple[int, int]] = []
    for start, stop in sorted({index[0].indices(shape[0])[:2] for index in held.values()}):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(stop, runs[-1][1]))
        else:
            runs.append((start, stop))
    return runs


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
