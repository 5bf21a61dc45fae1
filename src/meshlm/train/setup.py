"""The one builder of a run: mesh, rules, model, optimizer, shardings, state and compiled steps.

    run = build(cfg)                  # checks and abstract shapes only: nothing computed
    state = run.init_state()          # parameters and optimizer state, born sharded
    state, metrics = run.train_step(state, run.put(batch))
    sums = run.eval_step(state.params, run.put(batch))

The training loop, the tests, the benchmark scripts and the notebook all start here, so the
order of construction (and every check that needs the mesh) is written once. ``build`` raises
``ConfigError`` for settings that cannot work on the devices present before anything is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding

from meshlm import sharding
from meshlm.config import Config, ConfigError
from meshlm.data.batches import batch_shapes, decoder_fields
from meshlm.layers.pipeline import PipelineSchedule
from meshlm.models import build_model
from meshlm.train import xla_options
from meshlm.train.optimizer import make_optimizer
from meshlm.train.state import TrainState, create_train_state, state_shardings
from meshlm.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything built from a ``Config`` for one mesh. The steps compile on first use."""

    cfg: Config
    mesh: Mesh
    rules: tuple
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    abstract_state: TrainState  # ShapeDtypeStructs, each carrying its sharding
    batch_sharding: NamedSharding

    @property
    def shardings(self) -> TrainState:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    @functools.cached_property
    def batch_shapes(self) -> dict[str, tuple[int, int]]:
        """The global ``(rows, length)`` of each batch field (a seq2seq decoder side has
        ``data.target_len``)."""
        return batch_shapes(self.cfg)

    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh state from ``seed`` (default ``train.seed``), created sharded."""
        seed = self.cfg.train.seed if seed is None else seed
        return create_train_state(self.cfg.model, self.model, self.tx, self.mesh, self.rules,
                                  self.cfg.data.seq_len, jax.random.key(seed), self.shardings)

    @functools.cached_property
    def train_step(self) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
        return make_train_step(self)

    @functools.cached_property
    def eval_step(self) -> Callable[[Any, dict], dict]:
        return make_eval_step(self)

    def put(self, batch: dict | list[dict]) -> dict | list[dict]:
        """A host batch (or a list of them) -> global arrays under the batch sharding. With
        several processes each passes only its ``process_rows`` (``check_process_rows``);
        together they are one array. Fields of other lengths than compiled are a ValueError."""
        shapes = self.batch_shapes
        for one in batch if isinstance(batch, list) else [batch]:
            bad = {k: getattr(one.get(k), "shape", None) for k in shapes.keys() | one.keys()
                   if k not in shapes or k not in one or one[k].shape[1:] != shapes[k][1:]}
            if bad:
                raise ValueError(
                    f"batch fields {bad} (name: shape) do not match the compiled {shapes} "
                    "(data.seq_len, and data.target_len on a decoder side)")
        shapes = [shapes] * len(batch) if isinstance(batch, list) else shapes
        return jax.make_array_from_process_local_data(self.batch_sharding, batch, shapes)

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg)


def flops_per_token(cfg: Config) -> float:
    """The model's training FLOPs per ``data.seq_len`` row position; a sequence-to-sequence
    model counts its decoder side at ``data.target_len``."""
    if decoder_fields(cfg.model.batch_fields):
        return cfg.model.flops_per_token(cfg.data.seq_len,
                                         target_len=batch_shapes(cfg)["targets"][1])
    return cfg.model.flops_per_token(cfg.data.seq_len)


def build(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Run:
    """Check ``cfg`` against ``devices`` (default: every device) and build the run abstractly."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh)
    # what the model cannot split at all before what the batch must divide into
    cfg.model.validate_mesh(lambda logical: sharding.axis_size(mesh, rules, logical))
    heads, kv_heads = (_axes_of(mesh, rules, a) for a in ("activation_heads",
                                                          "activation_kv_heads"))
    if heads != kv_heads:  # the attention kernels read kv head h // group of the same device
        raise ConfigError(f"mesh.rules split activation_heads ({heads}) and activation_kv_heads "
                          f"({kv_heads}) differently; map both to the same mesh axes")
    check_batch(cfg, mesh, rules)
    model = pipelined(build_model(cfg.model), cfg, mesh, rules)
    check_kernels(cfg.model)  # after the pipeline's own limits, before anything is traced
    xla_options.check(cfg.train.xla_flags, mesh.devices.flat[0])
    tx, schedule = make_optimizer(cfg)
    abstract, _ = state_shardings(cfg.model, model, tx, mesh, rules, cfg.data.seq_len)
    return Run(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
               abstract_state=abstract, batch_sharding=sharding.batch_sharding(mesh, rules))


def check_kernels(model_cfg) -> None:
    """A kernel implementation named in the model config (``kernel_fields``) that the target
    cannot run is a ``ConfigError`` here, not a traceback from inside the model's trace."""
    for field, op in model_cfg.kernel_fields.items():
        name = getattr(model_cfg, field)
        if name in ("auto", "xla"):
            continue
        dispatch = importlib.import_module(f"pallas_kernels.{op}.api").DISPATCH
        if why := dispatch.unavailable(name, hint=False):
            raise ConfigError(f"model.{field}={name} {why}; use 'auto' (the fastest this "
                              "machine runs) or 'xla'")


def check_batch(cfg: Config, mesh: Mesh, rules) -> None:
    """The batch against the data-parallel size, the processes and the sequence shards."""
    t = cfg.train
    dp = sharding.data_parallel_size(mesh, rules)
    micro = cfg.data.batch_size // t.grad_accum
    if micro % dp:
        per = "" if t.grad_accum == 1 else (
            f" (micro-batches of {micro} rows with train.grad_accum={t.grad_accum})")
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}{per} is not divisible by the data-parallel "
            f"size {dp} (the mesh axes the 'activation_batch' rule maps to: "
            f"{_axes_of(mesh, rules, 'activation_batch')}); use a batch size that is a multiple "
            f"of {dp * t.grad_accum}"
        )
    seq_shards = sharding.axis_size(mesh, rules, "activation_length")
    for length in sorted({length for _, length in batch_shapes(cfg).values()}):
        name = "data.seq_len" if length == cfg.data.seq_len else "data.target_len"
        if length % seq_shards:
            raise ConfigError(
                f"{name}={length} is not divisible by the sequence-parallel size "
                f"{seq_shards} ({_axes_of(mesh, rules, 'activation_length')})"
            )
    check_process_rows(cfg, mesh, rules)  # (after the checks that make the batch shardable)


def pipelined(model: nn.Module, cfg: Config, mesh: Mesh, rules) -> nn.Module:
    """``model`` running its layer stack as ``mesh.pipeline`` stages (unchanged for one), the
    schedule checked against the model and the batch before anything is traced."""
    t, stages = cfg.train, mesh.shape["pipeline"]
    if stages == 1:
        if t.microbatches > 1 or t.pipeline_repeats > 1:
            raise ConfigError(
                f"train.microbatches={t.microbatches} and train.pipeline_repeats="
                f"{t.pipeline_repeats} apply to pipeline parallelism, but mesh.pipeline=1; set "
                "them to 1 (use train.grad_accum to split a batch without a pipeline)")
        return model
    if "pipeline" not in {f.name for f in dataclasses.fields(model)}:  # DecoderLM's field
        raise ConfigError(f"mesh.pipeline={stages}: model.family={cfg.model.family!r} "
                          f"({type(model).__name__}) has no pipelined layer stack; use "
                          "mesh.pipeline=1")
    if not cfg.model.scan_layers:
        raise ConfigError(f"mesh.pipeline={stages} needs model.scan_layers=true")
    if getattr(cfg.model, "attention", None) == "cudnn":
        # jax 0.11.2's batching rule for cuDNN attention reshapes a packed-document mask
        # (batch, 1, q, kv) to the head count under the stages' vmap and fails.
        raise ConfigError(f"mesh.pipeline={stages} cannot run model.attention='cudnn' (its "
                          "batching rule fails under the pipeline's stage vmap); use 'auto', "
                          "'mosaic_gpu' or 'triton'")
    pipe = PipelineSchedule(stages, t.microbatches, t.pipeline_repeats)
    n_layers, dp = cfg.model.n_layers, sharding.data_parallel_size(mesh, rules)
    blocks = cfg.model.stack_depth  # the stages split the repeated blocks
    if blocks % (stages * pipe.repeats):
        grouped = "" if blocks == n_layers else f" ({blocks} blocks of {n_layers // blocks})"
        raise ConfigError(
            f"model.n_layers={n_layers}{grouped} is not divisible by mesh.pipeline={stages} x "
            f"train.pipeline_repeats={pipe.repeats}; use a multiple of {stages * pipe.repeats}")
    rows = cfg.data.batch_size // t.grad_accum
    if rows % (dp * pipe.microbatches):
        raise ConfigError(
            f"train.microbatches={pipe.microbatches} does not divide the per-data-shard batch: "
            f"data.batch_size={cfg.data.batch_size} / train.grad_accum={t.grad_accum} = {rows} "
            f"rows over data-parallel size {dp} = {rows / dp:g}; use a batch size that is a "
            f"multiple of {dp * pipe.microbatches * t.grad_accum}")
    if pipe.repeats > 1 and pipe.microbatches < stages:
        raise ConfigError(
            f"train.pipeline_repeats={pipe.repeats} (the circular schedule) needs "
            f"train.microbatches >= mesh.pipeline, got {pipe.microbatches} < {stages}")
    return model.clone(pipeline=pipe)


def check_process_rows(cfg: Config, mesh: Mesh, rules) -> None:
    """Each process reads its ``process_rows`` block of every global batch; under the batch
    sharding its devices must hold exactly that block (``make_array_from_process_local_data``
    places the block on them)."""
    from meshlm.data.pipeline import process_rows

    b, index, count = cfg.data.batch_size, jax.process_index(), jax.process_count()
    rows = process_rows(b, index, count)
    held = sharding.rows_held(sharding.batch_sharding(mesh, rules), (b, cfg.data.seq_len))
    if held != [(rows.start, rows.stop)]:
        raise ConfigError(
            f"under the batch sharding ({_axes_of(mesh, rules, 'activation_batch')}) the devices "
            f"of process {index} hold rows {', '.join(f'[{a}, {z})' for a, z in held)} of each "
            f"{b}-row batch, but with {count} processes it reads rows [{rows.start}, "
            f"{rows.stop}); map the 'activation_batch' rule to mesh axes that split the devices "
            "of different processes, in process order"
        )


def _axes_of(mesh: Mesh, rules, logical: str) -> str:
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return " x ".join(f"{n}={mesh.shape[n]}" for n in names) or "none"

