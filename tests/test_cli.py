"""The ``meshlm`` entry point in-process: train a tiny model, sample from it, and bad input
exiting with status 2 and one message."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml

from meshlm.cli import EXIT_BAD_INPUT, main
from meshlm.train import checkpoint

TINY = {
    "model": {"vocab_size": 320, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
              "max_seq_len": 64, "attention": "xla", "dtype": "float32"},
    "data": {"seq_len": 32, "batch_size": 8, "max_files": 10},
    "optimizer": {"warmup_steps": 1},
    "train": {"steps": 4, "eval_every": 4, "eval_batches": 1, "log_every": 2,
              "progress_bar": False},
    "checkpoint": {"every": 2, "keep": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = root / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--config", str(config), f"train.run_dir={run_dir}"]) == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    return config, run_dir, summary


def test_train_writes_a_run_and_prints_a_summary(trained):
    _, run_dir, summary = trained
    assert summary["step"] == 4 and summary["val_loss"] > 0 and not summary["preempted"]
    assert checkpoint.finished_steps(run_dir) == [4]
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def test_generate_prints_the_prompt_and_a_continuation(trained, capsys):
    _, run_dir, _ = trained
    args = ["generate", "--run-dir", str(run_dir), "--prompt", "def main(", "--max-new-tokens",
            "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def main(") and len(first.strip()) > len("def main(")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # the seed fixes the sample


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "{config}", "model.no_such_key=1"], "unknown key 'model.no_such_key'"),
    (["train", "--config", "{config}", "model.d_model=abc"], "model.d_model: expected an integer"),
    (["train", "--config", "{missing}"], "does not exist"),
    (["generate", "--run-dir", "{missing}"], "no checkpoint in"),
    (["generate", "--run-dir", "{run}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--run-dir", "{run}", "--max-new-tokens", "100"], "model.max_seq_len=64"),
])
def test_bad_input_exits_2_with_one_message(trained, tmp_path, capsys, argv, message):
    config, run_dir, _ = trained
    argv = [a.format(config=config, run=run_dir, missing=tmp_path / "missing") for a in argv]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshlm: error: ") and message in err and "\n" not in err, err

