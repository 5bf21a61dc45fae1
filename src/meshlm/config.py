"""Every setting as a frozen dataclass, loaded from YAML plus ``section.key=value`` overrides.

One typed tree (``Config``) is the single source of truth for a run: models, mesh and sharding
rules, optimizer, data, loop and checkpointing. Loading is strict: an unknown key or a value of the
wrong type is a ``ConfigError`` naming the key and what is allowed, before anything is computed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A config key, value or combination is invalid; the message says what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields every model family has. Each family subclasses this in ``meshlm/models/<family>``
    with its own fields and behaviour (building its module, its loss, FLOPs, decoding cache) and
    registers it with ``register_family``; the ``model:`` section of a config is the dataclass of
    the family ``model.family`` names, and only that family's keys are accepted."""

    family: str = "gpt"  # a name registered with register_family
    vocab_size: int = 4096
    max_seq_len: int = 256  # longest sequence the model is built for (trained and decoded)
    d_model: int = 256
    n_layers: int = 4
    init_std: float = 0.02
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # activations / matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # False: the LM head writes its logits, the model's largest activation, in `dtype` (float32
    # accumulation), half the bytes for bfloat16, as torch autocast and MaxText do; the loss and
    # the samplers still compute in float32 from them.
    float32_logits: bool = True
    # The LayerNorm / RMSNorm layers' pallas_kernels.layer_norm implementation; "auto" runs the
    # Triton kernels for LayerNorm on a GPU (measured faster), XLA's fusions for RMSNorm.
    norm_implementation: Literal["auto", "xla", "triton"] = "auto"
    scan_layers: bool = True  # one compiled block scanned over a stacked "layers" axis
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention"] = "none"

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the key and what is allowed; families extend this."""
        self.require_positive("vocab_size", "max_seq_len", "d_model", "n_layers")

    @property
    def reserved_ids(self) -> int:
        """Ids at the end of the vocabulary a trained tokenizer leaves free (T5's sentinels)."""
        return 0

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    # A size (field or property) -> the logical axis that splits that dimension; validate_mesh
    # checks each divides evenly over its shards. Families extend it.
    sharded_fields: ClassVar[dict[str, str]] = {"vocab_size": "vocab", "d_model": "embed"}
    # A field naming a kernel implementation -> the pallas_kernels op it selects for; a named one
    # the target cannot run is a ConfigError before tracing (train.setup.check_kernels).
    kernel_fields: ClassVar[dict[str, str]] = {"norm_implementation": "layer_norm"}
    # Whether the family's layers run with the length axis sharded (context parallelism: ring
    # attention). Recurrent scans and T5's attention would gather the whole length instead.
    supports_context_parallel: ClassVar[bool] = False

    def validate_mesh(self, axis_size: Callable[[str], int]) -> None:
        """``ConfigError`` unless every size in ``sharded_fields`` divides over the shards of its
        logical axis; ``axis_size(logical)`` is that count under the run's mesh and rules."""
        if axis_size("activation_length") > 1 and not self.supports_context_parallel:
            raise ConfigError(
                f"model.family={self.family} has no context parallelism, but the mesh shards "
                f"the length {axis_size('activation_length')} ways (mesh.sequence); use "
                "mesh.sequence=1 (families with it: those whose layers attend by ring "
                "attention, e.g. gpt, moe)")
        for name, logical in self.sharded_fields.items():
            shards, size = axis_size(logical), getattr(self, name)
            if size % shards:
                raise ConfigError(
                    f"model.{name}={size} does not divide over the {shards} shards of logical "
                    f"axis {logical!r} (mesh.rules map it to mesh axes of that total size); use "
                    f"a multiple of {shards} or change the mesh"
                )


_FAMILIES: dict[str, type[ModelConfig]] = {}


def register_family(name: str):
    """Class decorator registering a ``ModelConfig`` subclass as ``model.family: name``."""

    def wrap(cls):
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, ModelConfig)):
            raise TypeError(f"{cls.__name__} must be a dataclass subclass of ModelConfig")
        _FAMILIES[name] = cls
        return cls

    return wrap


def model_config_class(family: str) -> type[ModelConfig]:
    """The registered config class of ``family`` (the model modules register on import)."""
    import meshlm.models  # noqa: F401  (registers every shipped family)

    if family not in _FAMILIES:
        raise ConfigError(
            f"model.family: unknown family {family!r}; choose one of {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[family]


def registered_families() -> dict[str, type[ModelConfig]]:
    """Every registered family name -> its config class (e.g. to find HF converters)."""
    import meshlm.models  # noqa: F401  (registers every shipped family)

    return dict(_FAMILIES)


def model_config(family: str = "gpt", **fields) -> ModelConfig:
    """A validated model config of ``family`` (keyword fields checked as a YAML section is)."""
    cfg = _from_dict(model_config_class(family), {"family": family, **fields}, "model")
    cfg.validate()
    return cfg


# Logical axis -> mesh axes (a name, a list of names, or null for replicated). Parameters and
# activations have separate names (MaxText's ``activation_*``), so a rule for one (e.g. sequence
# parallelism on ``activation_length``) never moves the other. Flax resolves each tensor's axes in
# order and skips a mesh axis already used by an earlier dimension.
MeshAxes = str | tuple[str, ...] | None
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_inner", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_expert", "expert"),
    ("activation_stage", "pipeline"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("inner", "tensor"),
    ("state", None),
    ("conv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("stage", "pipeline"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape (-1 on one axis: all remaining devices) and the logical-axis rule table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    pipeline: int = 1
    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``stdlib``: the Python standard library's own .py files (every
    Python has them); ``files``: the user's text files (``paths`` are globs); ``pairs``: JSONL
    (input, target) pairs for a sequence-to-sequence family (``paths`` are globs)."""

    source: Literal["stdlib", "files", "pairs"] = "stdlib"
    paths: tuple[str, ...] = ()
    # source "pairs" (sequence-to-sequence fine-tuning): JSONL files, one object a line, with
    # these (input, target) string fields
    pair_fields: tuple[str, str] = ("input", "target")
    # T5 span corruption (a sequence-to-sequence family on stdlib / files text)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    tokenizer: str | None = None  # path to a tokenizer.json; None: train a byte-level BPE
    seq_len: int = 256
    # sequence-to-sequence: the decoder's length (seq_len is the encoder's); None: what span
    # corruption's targets need at seq_len (T5: 512 -> 114), or seq_len for pairs
    target_len: int | None = None
    batch_size: int = 32  # global, in rows of seq_len tokens
    val_fraction: float = 0.05  # by file
    max_files: int | None = None
    seed: int = 0
    worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, accumulation, evaluation and logging cadence, the run directory."""

    steps: int = 300
    grad_accum: int = 1
    # pipeline parallelism (mesh.pipeline > 1): microbatches per accumulation step flowing
    # through the stages, and layer groups per stage (1: GPipe; more: the circular schedule)
    microbatches: int = 1
    pipeline_repeats: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    run_dir: str = "runs/default"
    profile_steps: tuple[int, ...] = ()  # (start, stop) to capture a jax profiler trace
    progress_bar: bool = True
    # XLA options of the compiled steps, written as XLA_FLAGS is ("--name=value ..."), over the
    # backend's measured defaults (meshlm.train.xla_options)
    xla_flags: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run_dir>/checkpoints``: every N steps, the last K kept."""

    every: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in run_dir when one exists
    # a run dir (e.g. ``meshlm convert hf-to-orbax``'s) whose latest parameters start a fresh run:
    # params only, new optimizer state, step 0; ignored when resuming
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=lambda: model_config_class("gpt")())
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def validate(self) -> "Config":
        self.model.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        if self.train.grad_accum < 1 or self.data.batch_size % self.train.grad_accum:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be a multiple of "
                f"train.grad_accum={self.train.grad_accum} (>= 1)"
            )
        t = self.train
        if t.microbatches < 1 or t.pipeline_repeats < 1:
            raise ConfigError(f"train.microbatches={t.microbatches} and train.pipeline_repeats="
                              f"{t.pipeline_repeats} must be >= 1")
        return self


# ----------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checking.


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose {_type_name(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        if tp is ModelConfig:  # the section's class is the family's
            family = value.get("family", ModelConfig.family)
            if not isinstance(family, str):
                raise ConfigError(f"{key}.family: expected a string, got {family!r}")
            tp = model_config_class(family)
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            where = f"for model.family {data.get('family', cls.family)!r}" if issubclass(
                cls, ModelConfig) else "here"
            raise ConfigError(
                f"unknown key {key!r}; valid keys {where}: {', '.join(sorted(fields))}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def from_dict(tree: dict) -> Config:
    """A validated ``Config`` from a nested dict (the inverse of ``to_dict``)."""
    return _from_dict(Config, tree).validate()


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) that round-trips through YAML and ``from_dict``."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", c) with c parsed as YAML (so 3, 1e-3, true, [1, 2], null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.strip(), value


def load_config(path: str | pathlib.Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then overrides in order; validated."""
    tree: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # the parser's mark says where the text stops being YAML
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {what}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    return from_dict(tree)


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
