"""HuggingFace checkpoint directory <-> meshlm run directory.

``hf_to_orbax`` translates ``config.json`` with the family registered for its ``model_type``,
reads each tensor of the family's table (``hf_tensors()``) once, re-lays it out and places it
straight onto the parameter's sharding under the run's mesh and rules
(``jax.make_array_from_callback``: each device receives only its slice), and writes a run
directory: ``config.yaml``, the tokenizer files, and an Orbax checkpoint (step 0, parameters
only) that ``checkpoint.restore_params``, ``meshlm generate`` and ``checkpoint.init_from`` read.
``orbax_to_hf`` is the inverse: safetensors (sharded at a size limit, with the index),
``config.json`` and the tokenizer files, loadable by ``transformers``.

Host memory: one HF tensor at a time, except that a scanned model's parameter is stacked over its
layers on the host before it is placed (the largest such stack, e.g. all layers' query kernels,
bounds the peak). Both directions write into a temporary sibling directory renamed into place at
the end, so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from meshlm import sharding
from meshlm.config import (Config, DataConfig, MeshConfig, TrainConfig, registered_families,
                           save_config, to_dict)
from meshlm.convert.mapping import ConversionError, HFTensor
from meshlm.convert.safetensors_dir import CONFIG_FILE, HFCheckpoint, write_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = ("float32", "bfloat16")
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size


def hf_families() -> dict[str, type]:
    """HF ``model_type`` -> the meshlm family config class that converts it. Only a class's own
    ``hf_model_types`` count: a family subclassing another (MoE on GPT) does not inherit them."""
    return {t: cls for cls in registered_families().values()
            for t in vars(cls).get("hf_model_types", ())}


def family_for(model_type: Any) -> type:
    families = hf_families()
    if model_type not in families:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(families))}")
    return families[model_type]


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): x for path, x in leaves}


def _unflat(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


def _target(param: str, layer: int | None, scan: bool, stack: str = "") -> str:
    """The flat param path of ``param`` (relative to a layer's block of the layer stack under
    ``stack`` when ``layer`` is given)."""
    if layer is None:
        return param
    return f"{stack}layers/{param}" if scan else f"{stack}layers_{layer}/{param}"


def _prepare_out(out: str | os.PathLike, overwrite: bool) -> tuple[pathlib.Path, pathlib.Path]:
    """``(out, a fresh temporary sibling to write into)``; refuses an existing non-empty ``out``
    unless ``overwrite``."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{str(out)!r} already exists; choose another output directory or "
                              "pass --overwrite")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return out, tmp


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ------------------------------------------------------------------------------- HF -> Orbax


def run_config(hf_config: dict, dtype: str = "float32", mesh: MeshConfig = MeshConfig(),
               run_dir: str = "runs/converted") -> Config:
    """The run ``Config`` of a HF ``config.json``: the family's model config with ``dtype`` as
    both parameter and compute dtype, defaults elsewhere (sequence length capped by the model)."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    cls = family_for(hf_config.get("model_type"))
    model = dataclasses.replace(cls.from_hf_config(hf_config), dtype=dtype, param_dtype=dtype)
    data = DataConfig(seq_len=min(DataConfig.seq_len, model.max_seq_len))
    return Config(model=model, mesh=mesh, data=data, train=TrainConfig(run_dir=run_dir)).validate()


def abstract_params(cfg: Config, devices=None) -> Any:
    """The model's parameters as ``ShapeDtypeStruct``s carrying their sharding under the run's
    mesh and rules (the same shardings training uses)."""
    from meshlm.models import build_model
    from meshlm.train.state import state_shardings

    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.axis_rules(cfg.mesh)
    cfg.model.validate_mesh(lambda logical: sharding.axis_size(mesh, rules, logical))
    abstract, _ = state_shardings(cfg.model, build_model(cfg.model), optax.identity(), mesh,
                                  rules, cfg.data.seq_len)
    return abstract.params


def _expected_hf_shape(t: HFTensor, targets: dict, layer: int | None, scan: bool):
    """The shape ``t`` must have for this model: its inverse layout applied to uninitialised
    (never touched) arrays of the parameters' shapes."""
    parts = []
    for p in t.params:
        shape = targets[_target(p, layer, scan, t.stack)].shape
        parts.append(np.empty(shape[1:] if layer is not None and scan else shape, np.uint8))
    return tuple(t.to_hf(*parts).shape)


def _place(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    array = array.astype(target.dtype, copy=False)
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: array[index])


def load_hf_params(ckpt: HFCheckpoint, model_cfg, abstract: Any) -> Any:
    """The params tree of ``model_cfg`` read from ``ckpt``, each array placed with the sharding
    of its ``abstract`` leaf. Every table tensor must exist with the shape the model needs, and
    every stored tensor must be in the table or ``hf_ignored``."""
    targets = _flat(abstract)
    scan, n_layers = model_cfg.scan_layers, model_cfg.n_layers
    table = model_cfg.hf_tensors()
    plan = [(t, i) for t in table for i in t.layers(n_layers)]
    names = [n for t, i in plan for n in t.hf_names(i)]
    wanted = {ckpt.resolve(n) for n in names}
    missing = [n for n in names if ckpt.resolve(n) is None]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConversionError(f"tensor {missing[0]!r}{', ' if missing[1:] else ''}"
                              f"{', '.join(repr(m) for m in missing[1:3])}{more} missing from "
                              f"the checkpoint in {str(ckpt.dir)!r}")
    ignored = [re.compile(p) for p in model_cfg.hf_ignored]
    unexpected = sorted(n for n in ckpt.files if n not in wanted
                        and not any(p.search(n) for p in ignored))
    if unexpected:
        raise ConversionError(
            f"the checkpoint in {str(ckpt.dir)!r} has tensors this {model_cfg.family} model has "
            f"no parameter for: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")

    placed: dict[str, jax.Array] = {}
    for t in table:
        stacks: dict[str, np.ndarray] = {}  # scanned: the layers of each param, filled in place
        for i in t.layers(n_layers):
            name, *per_expert = t.hf_names(i)  # per-expert tensors: stacked, as in the table
            w = np.stack([ckpt.get(n) for n in (name, *per_expert)]) if per_expert else ckpt.get(
                name)
            expected = _expected_hf_shape(t, targets, i, scan)
            if tuple(w.shape) != expected:
                raise ConversionError(f"tensor {name!r} has shape {list(w.shape)}, this model "
                                      f"needs {list(expected)}")
            for p, a in zip(t.params, t.to_params(w)):
                if i is not None and scan:
                    target = targets[_target(p, i, scan, t.stack)]
                    if p not in stacks:
                        stacks[p] = np.empty(target.shape, target.dtype)
                    stacks[p][i] = a
                else:
                    path = _target(p, i, scan, t.stack)
                    placed[path] = _place(a, targets[path])
            del w
        for p, stack in stacks.items():
            path = _target(p, 0, True, t.stack)
            placed[path] = _place(stack, targets[path])
        del stacks
    left = sorted(targets.keys() - placed.keys())
    if left:  # a table that misses a parameter is a bug in the family's mapping
        raise ConversionError(f"the {model_cfg.family} HF table fills no value for {left}")
    return _unflat(placed)


def write_run(run_dir: pathlib.Path, cfg: Config, params: Any) -> None:
    """A run directory holding ``params`` as the step-0 Orbax checkpoint ``restore_params`` reads
    (items ``state`` = ``{"params": ...}``, an empty ``data`` and the ``config``)."""
    from meshlm.train.checkpoint import ITEMS, checkpoint_dir

    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(checkpoint_dir(run_dir), item_names=ITEMS,
                               options=options) as manager:
        manager.save(0, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": params}), data=ocp.args.JsonSave({}),
            config=ocp.args.JsonSave(to_dict(cfg))))
        manager.wait_until_finished()
    save_config(cfg, run_dir / "config.yaml")


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                mesh: MeshConfig = MeshConfig(), overwrite: bool = False,
                devices=None) -> Config:
    """Convert the HF directory ``hf_dir`` into the run directory ``out``; returns its config.
    ``mesh`` (default: data parallel over every device, i.e. replicated parameters) decides
    where the parameters live while they are written."""
    ckpt = HFCheckpoint(hf_dir)
    cfg = run_config(ckpt.config, dtype, mesh, str(out))
    abstract = abstract_params(cfg, devices)
    out, tmp = _prepare_out(out, overwrite)
    try:
        params = load_hf_params(ckpt, cfg.model, abstract)
        write_run(tmp, cfg, params)
        _copy_tokenizer(ckpt.dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return cfg


# ------------------------------------------------------------------------------- Orbax -> HF


def hf_state(model_cfg, params: Any):
    """``(HF name, numpy array)`` of every tensor of the family's table, in table order."""
    flat, scan = _flat(params), model_cfg.scan_layers
    for t in model_cfg.hf_tensors():
        for i in t.layers(model_cfg.n_layers):
            arrays = []
            for p in t.params:
                a = flat[_target(p, i, scan, t.stack)]
                arrays.append(np.asarray(a[i] if i is not None and scan else a))
            w, names = t.to_hf(*arrays), t.hf_names(i)
            yield from zip(names, w) if t.n_experts else [(names[0], w)]


def orbax_to_hf(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write the latest parameters of ``run_dir`` as a HF directory ``out``; returns its
    ``config.json``."""
    import json

    from meshlm.train.checkpoint import restore_params

    cfg, params = restore_params(run_dir)
    if not vars(type(cfg.model)).get("hf_model_types"):  # not inherited: MoE is not GPT's table
        raise ConversionError(
            f"model.family={cfg.model.family!r} has no HuggingFace conversion; families that "
            f"have one: {', '.join(sorted({c.family for c in hf_families().values()}))}")
    hf_config = {**cfg.model.to_hf_config(), "dtype": cfg.model.param_dtype}
    out, tmp = _prepare_out(out, overwrite)
    try:
        write_shards(hf_state(cfg.model, params), tmp, max_shard_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        _copy_tokenizer(pathlib.Path(run_dir), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)
    return hf_config
