"""What a training run prints while it runs: a progress bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, which a log file or a pipe keeps as clutter; so the
bar is used only when ``train.progress_bar`` is on and the stream is a terminal. Otherwise every
logging interval is one line (step, loss, learning rate, tokens/s, MFU), so the loss reaches the
console either way. Everything goes to stderr (with the log lines); stdout keeps the summary.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

from meshlm.train.metrics import format_mfu


class Console:
    """``step()`` after every step, ``train(...)`` per logging interval, ``eval(...)`` per
    evaluation, ``note(text)`` for any other line, ``close()`` at the end. A process that is not
    ``primary`` prints nothing (one process speaks for a multi-process run)."""

    def __init__(self, total_steps: int, initial_step: int, *, progress_bar: bool = True,
                 primary: bool = True, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.total = total_steps
        self.primary = primary
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                        file=self.stream) if primary and progress_bar and is_tty else None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, loss: float, lr: float, tokens_per_s: float,
              mfu: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                 mfu=format_mfu(mfu), refresh=False)
        else:
            self.note(f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.3g}, "
                      f"{tokens_per_s:,.0f} tokens/s, MFU {format_mfu(mfu)}")

    def eval(self, step: int, loss: float, perplexity: float) -> None:
        self.note(f"step {step}: val loss {loss:.4f}, perplexity {perplexity:.2f}")

    def note(self, text: str) -> None:
        if not self.primary:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
