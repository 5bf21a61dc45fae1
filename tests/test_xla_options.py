"""``train.xla_flags``: parsed as XLA_FLAGS is, over the backend's defaults, checked before the
model is traced, and given to the compiled steps."""

import jax
import numpy as np
import pytest
from _helpers import packed_batches

from meshlm.config import ConfigError, load_config
from meshlm.train import setup, xla_options


def test_parse_types_values_as_xla_takes_them():
    got = xla_options.parse("--a_bool=False --b_int=32 --c_float=0.5 --d_str=dot-merger --e_flag")
    assert got == {"a_bool": False, "b_int": 32, "c_float": 0.5, "d_str": "dot-merger",
                   "e_flag": True}
    assert xla_options.parse("  ") == {}


@pytest.mark.parametrize("flags", ["xla_gpu_enable_triton_gemm=false", "-x=1", "--=1"])
def test_parse_rejects_a_word_that_is_not_a_flag(flags):
    with pytest.raises(ConfigError, match="is not an XLA flag"):
        xla_options.parse(flags)


def test_config_flags_override_the_backend_defaults():
    assert xla_options.compiler_options("", "gpu") == {"xla_gpu_enable_triton_gemm": False}
    got = xla_options.compiler_options("--xla_gpu_enable_triton_gemm=true --x=1", "gpu")
    assert got == {"xla_gpu_enable_triton_gemm": True, "x": 1}
    assert xla_options.compiler_options("", "cpu") == {}


@pytest.mark.parametrize("flags, match", [
    ("--xla_no_such_option=1", "No such compile option"),
    ("--xla_gpu_enable_triton_gemm=3", "xla_gpu_enable_triton_gemm"),
])
def test_build_rejects_what_xla_rejects(flags, match):
    cfg = load_config("configs/default.yaml", [f"train.xla_flags={flags}"])
    with pytest.raises(ConfigError, match=f"train.xla_flags=.*{match}"):
        setup.build(cfg)


def test_the_compiled_steps_get_the_options(monkeypatch):
    """The options reach ``compile``: an option XLA does not know, slipped past ``build``'s
    check, fails the step's compilation, and a valid one compiles a step that runs."""
    cfg = load_config("configs/default.yaml", [
        "train.xla_flags=--xla_disable_hlo_passes=dot-merger", "model.n_layers=1",
        "data.batch_size=8", "data.seq_len=16"])
    run = setup.build(cfg)
    state = run.init_state()
    _, metrics = run.train_step(state, run.put(packed_batches(cfg, 1)[0]))
    assert np.isfinite(metrics["loss"])

    run = setup.build(cfg)
    monkeypatch.setattr(xla_options, "BACKEND_DEFAULTS", {"cpu": "--xla_no_such_option=1"})
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
        run.train_step
