"""Kernels on sharded activations: one kernel call per device, on that device's block.

XLA's partitioner cannot split a Pallas kernel (an opaque custom call): given operands sharded
over the mesh it gathers them and runs the whole kernel on every device (jax-triton#163), so a
data-parallel run would compute every device's attention on every device. Model code therefore
calls its kernels through ``per_shard`` with each operand's logical axes: the mesh axes that the
current rules give those axes become the manual axes of a ``shard_map`` around the call. Inside
the pipeline's stage ``vmap`` (``layers/pipeline.py``) the stage axes are manual too, so each
device also runs only its own stage. The plain-JAX ("xla") implementations need none of this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels._api import target_platform

Axes = tuple[str | None, ...]


def mesh_axes(logical: str | None, mesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 that the current rules give ``logical``."""
    if logical is None:
        return ()
    spec = nn.logical_to_mesh_axes((logical,))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def partition_spec(axes: Axes, mesh) -> P:
    """``axes`` (logical names per dimension) as a PartitionSpec of mesh axes of size > 1."""
    def entry(name):
        found = mesh_axes(name, mesh)
        return found[0] if len(found) == 1 else (found or None)
    return P(*(entry(a) for a in axes))


def runs_a_kernel(implementation: str) -> bool:
    """Whether an op called with ``implementation`` may run a kernel the partitioner cannot
    split: anything but the plain-JAX form ("auto" is always that on a CPU target)."""
    return implementation != "xla" and not (implementation == "auto"
                                            and target_platform() == "cpu")


def per_shard(fn: Callable[..., Any], operands: Sequence[tuple[jax.Array | None, Axes]],
              out_axes: Axes | tuple[Axes, ...]) -> Any:
    """``fn(*arrays)`` run on each device's blocks; ``operands`` are ``(array or None, its
    logical axes)``, ``out_axes`` the logical axes of ``fn``'s output (a tuple of them for a tuple
    of outputs). ``fn`` must act independently along every sharded axis (a batch row, a head, a
    channel): it sees only its device's slice of each. Without a mesh, or with nothing sharded,
    it is ``fn(*arrays)``.

    ``check_vma=False``: compiled and interpret-mode Pallas kernels differ in the varying-axes
    types they give; without the check, an operand replicated over a manual axis (a parameter
    next to a sharded batch) still gets the sum of every device's gradient.
    """
    arrays = [a for a, _ in operands]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return fn(*arrays)
    present = [(a, partition_spec(axes, mesh)) for a, axes in operands if a is not None]
    several = bool(out_axes) and isinstance(out_axes[0], tuple)
    out_specs = (tuple(partition_spec(o, mesh) for o in out_axes) if several
                 else partition_spec(out_axes, mesh))
    manual = set(mesh_axes("activation_stage", mesh))  # (added to the specs by the stage vmap)
    for spec in [s for _, s in present] + list(out_specs if several else [out_specs]):
        for entry in spec:
            manual.update((entry,) if isinstance(entry, str) else entry or ())
    if not manual:
        return fn(*arrays)
    where = [a is not None for a in arrays]

    def local(*given):
        it = iter(given)
        return fn(*(next(it) if here else None for here in where))

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(s for _, s in present),
                         out_specs=out_specs, axis_names=manual, check_vma=False)(
        *(a for a, _ in present))
