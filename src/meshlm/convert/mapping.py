"""The vocabulary of the per-family HuggingFace tables: one ``HFTensor`` per tensor of a HF
checkpoint, saying which meshlm parameters it becomes and how its layout changes.

A family's config class lists them (``hf_tensors()``, in ``models/<family>.py``); the machinery in
``convert/`` reads, places and writes them without knowing any family. Layout functions work on
numpy arrays of one layer (never the stacked ``layers`` axis), so a table reads the same whether
the model scans its layers or unrolls them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from meshlm.config import ConfigError

LAYER = "{i}"  # stands for the layer index in a per-layer HF name
EXPERT = "{e}"  # stands for the expert index in a per-expert HF name (MoE)


class ConversionError(ConfigError):
    """A HF checkpoint or a run directory cannot be converted; names the tensor, file or option."""


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """HF tensor ``hf`` (``"...layers.{i}..."`` when per layer) <-> meshlm ``params`` (paths like
    ``"attention/query/kernel"``, relative to a layer's block when per layer, else to the
    model's params root). ``to_params(w) -> tuple`` (one array per param) and ``to_hf(*arrays)
    -> w`` are exact inverses (pure re-layouts: transposes, reshapes, splits)."""

    hf: str
    params: tuple[str, ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    # Per-layer tensors of a model with several layer stacks (T5's encoder and decoder): the
    # params path the stack's ``layers`` sit under (e.g. ``"encoder/"``) and its layer count
    # (None: the model's ``n_layers``).
    stack: str = ""
    n_layers: int | None = None
    # Per-expert tensors (``{e}`` in ``hf``): the ``n_experts`` HF tensors, stacked on a new
    # leading axis, are the one array ``to_params`` / ``to_hf`` see.
    n_experts: int = 0

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf

    def hf_names(self, layer: int | None) -> list[str]:
        """The HF tensors read for ``layer``: one, or one per expert."""
        name = self.hf_name(layer)
        if EXPERT not in name:
            return [name]
        return [name.replace(EXPERT, str(e)) for e in range(self.n_experts)]

    def layers(self, model_layers: int) -> range | list[None]:
        """The layer indices this tensor is read for (``[None]``: not per layer)."""
        if not self.per_layer:
            return [None]
        return range(model_layers if self.n_layers is None else self.n_layers)

    def hf_name(self, layer: int | None) -> str:
        return self.hf.replace(LAYER, str(layer)) if self.per_layer else self.hf


def same(hf: str, param: str) -> HFTensor:
    """Stored alike (embeddings, norm scales, biases, per-channel vectors)."""
    return HFTensor(hf, (param,), lambda w: (w,), lambda p: p)


def linear(hf: str, param: str, out_shape: tuple[int, ...] = (),
           in_shape: tuple[int, ...] = ()) -> HFTensor:
    """A ``torch.nn.Linear`` weight ``(out, in)`` -> kernel ``(*in_shape, *out_shape)`` (the
    transpose, then the flat in/out dimensions split, e.g. into heads x head_dim)."""

    def to_params(w):
        out, inp = w.shape
        return (w.T.reshape(*(in_shape or (inp,)), *(out_shape or (out,))),)

    def to_hf(k):
        n_in = int(np.prod(in_shape)) if in_shape else k.shape[0]
        return k.reshape(n_in, -1).T

    return HFTensor(hf, (param,), to_params, to_hf)


def conv1d(hf: str, param: str, out_shape: tuple[int, ...] = (),
           in_shape: tuple[int, ...] = ()) -> HFTensor:
    """A GPT-2 ``Conv1D`` weight, already ``(in, out)``: only the reshape of ``linear``."""

    def to_params(w):
        inp, out = w.shape
        return (w.reshape(*(in_shape or (inp,)), *(out_shape or (out,))),)

    def to_hf(k):
        n_in = int(np.prod(in_shape)) if in_shape else k.shape[0]
        return k.reshape(n_in, -1)

    return HFTensor(hf, (param,), to_params, to_hf)


def split(hf: str, params: tuple[str, ...], sizes: tuple[int, ...], axis: int,
          to_parts: Callable[[np.ndarray, int], np.ndarray] = lambda w, _: w,
          from_parts: Callable[[np.ndarray, int], np.ndarray] = lambda p, _: p) -> HFTensor:
    """A fused HF tensor cut along ``axis`` into pieces of ``sizes`` (GPT-2's ``c_attn``,
    Mamba-2's ``in_proj`` and ``conv1d``); piece ``j`` becomes ``params[j]`` through
    ``to_parts(piece, j)``, and ``from_parts(param, j)`` is its inverse."""
    cuts = np.cumsum(sizes)[:-1]

    def to_params(w):
        if w.shape[axis] != sum(sizes):
            raise ValueError(f"axis {axis} has {w.shape[axis]} entries, expected {sum(sizes)}")
        return tuple(to_parts(piece, j) for j, piece in enumerate(np.split(w, cuts, axis=axis)))

    def to_hf(*parts):
        return np.concatenate([from_parts(p, j) for j, p in enumerate(parts)], axis=axis)

    return HFTensor(hf, params, to_params, to_hf)


def hf_option(hf: dict, key: str, supported, default=None):
    """``hf[key]`` (``default`` when absent) if it is among ``supported``, else a ``ConfigError``
    naming the option: a HF setting meshlm does not implement is never silently dropped."""
    value = hf.get(key, default)
    if value not in supported:
        allowed = ", ".join(repr(s) for s in supported)
        raise ConfigError(f"config.json: {key}={value!r} is not supported (supported: {allowed})")
    return value


def expert_linears(hf: str, param: str, n_experts: int) -> HFTensor:
    """Each expert's ``torch.nn.Linear`` weight ``(out, in)`` (``{e}`` in ``hf``) -> the stacked
    kernel ``(experts, in, out)``."""
    return HFTensor(hf, (param,), lambda w: (np.swapaxes(w, 1, 2),),
                    lambda k: np.swapaxes(k, 1, 2), n_experts=n_experts)


def reshaped(hf: str, param: str, shape: tuple[int, ...]) -> HFTensor:
    """A flat HF vector (a bias over heads x head_dim) -> ``shape``."""
    return HFTensor(hf, (param,), lambda w: (w.reshape(shape),), lambda p: p.reshape(-1))
