"""The ``meshlm`` entry point in-process: README's quick start (its train command on the default
config, made tiny by appended overrides, then its generate command as written), sampling, and
bad input exiting with status 2 and one message."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shlex
import shutil

import jax
import pytest

from meshlm.cli import EXIT_BAD_INPUT, main
from meshlm.train import checkpoint

pytestmark = pytest.mark.usefixtures("fast_compile")

REPO = pathlib.Path(__file__).parents[1]
# Appended to the README's train command: a model and corpus small enough for CI. The default
# config's 128 learned positions, sequence length, batch and warmup stay as shipped.
TINY = ["train.steps=3", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
        "model.d_ff=64", "model.vocab_size=300", "data.max_files=12", "train.eval_batches=1"]


def readme_commands() -> dict[str, list[str]]:
    """The ``meshlm`` command lines of README.md's code blocks, by subcommand."""
    text = (REPO / "README.md").read_text()
    commands = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith(".venv/bin/meshlm "):
            argv = shlex.split(line)[1:]
            commands[argv[0]] = argv
    return commands


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """README's train command, run where the README's relative paths (configs/, runs/default)
    hold: ``(config, run_dir, summary, where)``."""
    where = tmp_path_factory.mktemp("cli")
    shutil.copytree(REPO / "configs", where / "configs")
    out = io.StringIO()
    with contextlib.chdir(where), contextlib.redirect_stdout(out):
        assert main([*readme_commands()["train"], *TINY]) == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    return where / "configs" / "default.yaml", where / "runs" / "default", summary, where


def test_train_writes_a_run_and_prints_a_summary(trained):
    _, run_dir, summary, _ = trained
    assert summary["step"] == 3 and summary["val_loss"] > 0 and not summary["preempted"]
    assert checkpoint.finished_steps(run_dir) == [3]
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def test_generate_prints_the_prompt_and_a_continuation(trained, capsys):
    _, run_dir, _, _ = trained
    args = ["generate", "--run-dir", str(run_dir), "--prompt", "def main(", "--max-new-tokens",
            "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def main(") and len(first.strip()) > len("def main(")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # the seed fixes the sample


# a kernel named in the config that this host cannot run
ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GPU runs these kernels")


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "{config}", "model.no_such_key=1"], "unknown key 'model.no_such_key'"),
    (["train", "--config", "{config}", "model.d_model=abc"], "model.d_model: expected an integer"),
    (["train", "--config", "{missing}"], "does not exist"),
    (["train", "--config", "{config}", "train.xla_flags=--xla_no_such_option=1"],
     "train.xla_flags='--xla_no_such_option=1': XLA rejects it"),
    (["train", "--config", "{config}", "model.fuse_qkv=true", "model.n_kv_heads=1"],
     "model.fuse_qkv needs model.position='learned' and model.n_kv_heads = n_heads"),
    pytest.param(["train", "--config", "{config}", "model.norm_implementation=triton"],
                 "model.norm_implementation=triton needs a GPU backend, got cpu; use 'auto'",
                 marks=ON_CPU),
    pytest.param(["train", "--config", "{config}", "model.mlp_implementation=triton"],
                 "model.mlp_implementation=triton needs a GPU backend, got cpu", marks=ON_CPU),
    (["train", "--config", "{config}", "model.mlp_implementation=cuda"],
     "model.mlp_implementation: 'cuda' is not allowed; choose one of 'auto', 'xla', 'triton'"),
    pytest.param(["train", "--config", "{config}", "model.attention=mosaic_gpu"],
                 "model.attention=mosaic_gpu needs a GPU backend, got cpu", marks=ON_CPU),
    (["generate", "--run-dir", "{missing}"], "no checkpoint in"),
    (["generate", "--run-dir", "{run}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--run-dir", "{run}", "--top-k", "301"],
     "--top-k 301 exceeds the model's vocabulary (model.vocab_size=300)"),
    (["generate", "--run-dir", "{run}", "--temperature", "nan"], "temperature must be a finite"),
    (["generate", "--run-dir", "{run}", "--temperature", "inf"], "temperature must be a finite"),
    (["generate", "--run-dir", "{run}", "--temperature", "-0.5"], "temperature must be a finite"),
    (["generate", "--run-dir", "{run}", "--prompt", "x " * 150], "leaves no room in the model's "
     "context of model.max_seq_len=128"),
])
def test_bad_input_exits_2_with_one_message(trained, tmp_path, capsys, argv, message):
    config, run_dir, _, _ = trained
    argv = [a.format(config=config, run=run_dir, missing=tmp_path / "missing") for a in argv]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshlm: error: ") and message in err and "\n" not in err, err



def test_malformed_yaml_is_one_line_with_its_position(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  d_model: 32\n  n_layers: [1\ntrain:\n  steps: 3\n")
    assert main(["train", "--config", str(config)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"meshlm: error: {config}:4:6: not valid YAML") and "\n" not in err, err


def test_generate_stops_at_the_models_context(trained, capsys):
    """More new tokens than the learned positions hold: the sample stops at model.max_seq_len
    with one note on stderr instead of refusing."""
    _, run_dir, _, _ = trained
    args = ["generate", "--run-dir", str(run_dir), "--prompt", "def main(", "--temperature",
            "0", "--max-new-tokens"]
    assert main([*args, "150"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def main(")
    assert err.count("\n") == 1 and "context is 128 tokens" in err, err
    assert main([*args, "5"]) == 0
    assert capsys.readouterr().err == ""  # within the context: no note


def test_readme_generate_runs_as_written(trained, monkeypatch, capsys):
    """README's generate command exactly as written, after its train command (the fixture),
    then with the default --max-new-tokens: both ask for more tokens than the default model's
    128 learned positions hold after the prompt."""
    monkeypatch.chdir(trained[3])
    generate = readme_commands()["generate"]
    assert main(generate) == 0
    out, err = capsys.readouterr()
    assert out.startswith(generate[generate.index("--prompt") + 1])
    assert "context is 128 tokens" in err
    i = generate.index("--max-new-tokens")
    assert main(generate[:i] + generate[i + 2:]) == 0


def test_an_error_line_is_one_write(monkeypatch):
    """Each ``meshlm: error:`` line reaches stderr in one write: ``print`` wrote the text and
    its newline apart on an unbuffered stderr (``PYTHONUNBUFFERED``), and a multi-host run's Gloo
    log line from another thread landed between them."""
    from meshlm import cli
    from meshlm.config import ConfigError

    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

    monkeypatch.setattr(cli.sys, "stderr", Recorder())
    assert cli._failure(ConfigError("model.d_state is not a gpt key")) == EXIT_BAD_INPUT
    assert cli._failure(OSError("disk full")) == cli.EXIT_FAILED
    assert writes == ["meshlm: error: model.d_state is not a gpt key\n",
                      "meshlm: error: disk full\n"]
